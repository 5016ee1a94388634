"""`fastdrag eval`: run a method over DragBench or Drag100 and score it with the field's metrics.

Built only on the public API (fastdrag.load_model, fastdrag.Editor): the editing phase writes one folder per
sample, the scoring phase reads them back; both resume.
"""

from .datasets import DRAG100, DRAGBENCH, DatasetError, Sample, SampleRef, check_dataset, read_sample, scan

__all__ = ["DRAGBENCH", "DRAG100", "DatasetError", "Sample", "SampleRef", "check_dataset", "read_sample", "scan"]
