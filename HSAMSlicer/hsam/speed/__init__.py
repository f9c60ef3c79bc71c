"""Speed measurement: every engine of :mod:`hsam.engines` against eager fp32 in one process (``hsam bench``)."""
