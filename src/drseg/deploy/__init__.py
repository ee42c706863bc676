"""From a registered version to a promoted canary on Argo Rollouts.

publish: a version's Triton repository into the object store the Rollout serves from.
probe: `drseg probe`, the analysis Job that checks the canary against the registered graph
and against stable on a labelled probe set. kube: the Kubernetes calls (the Rollout, its
AnalysisRuns, the stable ReplicaSet). argo: set the version, read the status, promote and
abort as `kubectl argo rollouts` does. champion: MLflow's @champion follows the cluster.
"""
