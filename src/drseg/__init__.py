"""drseg: a retraining pipeline for diabetic-retinopathy lesion segmentation."""

__version__ = "0.1.0"
