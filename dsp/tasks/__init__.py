"""Output spaces: how predictions are made, decoded, scored and saved for each kind of data."""
from __future__ import annotations


def task_for(data):
    """The task of a loaded dataset: sequences (OCR, chunking), image masks, denoising images or
    multi-label vectors."""
    from dsp.data.denoise import DenoiseSplits
    from dsp.data.images import ImageMaskSplits
    from dsp.data.sequences import SequenceSplits
    from dsp.tasks.multilabel import MultiLabelTask
    from dsp.tasks.sequence import SequenceTask

    if isinstance(data, SequenceSplits):
        return SequenceTask(data.label_names, data.augment)
    if isinstance(data, DenoiseSplits):
        from dsp.tasks.denoising import DenoisingTask

        return DenoisingTask(data.crop, data.sigma, data.pixels)
    if isinstance(data, ImageMaskSplits):
        from dsp.tasks.segmentation import SegmentationTask

        return SegmentationTask(data.crop, data.flip, data.test_crops, data.combine, data.augment,  # the crop protocol
                                data.warp_source)
    return MultiLabelTask()


def takes_rows(task) -> bool:
    """Whether task.batch(x, y, index=rows) wants each batch's rows of the training split (tasks that
    keep a per-example resource: the horses' larger copies for warping)."""
    return task.takes_rows
