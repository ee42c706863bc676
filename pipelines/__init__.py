"""The pipeline definition(s); one DAG for the laptop (kfp.local) and the cluster."""
