from kfp import dsl

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def fingerprint(source: str) -> str:
    """The source's listing hash (keys, sizes, mtimes or ETags); never cached, it is what
    lets ingest and everything after it be cached on an unchanged source."""
    from drseg.config import load_settings
    from drseg.data.ingest import source_fingerprint

    return source_fingerprint(source, load_settings().storage)
