"""The segmentation path of ``hsam segment``: a CT volume in, organ labels + confidence on the same grid out.

Stages, one module each (hsam-model.md §3; ``docs/cli.md`` "How the segmentation path is built"):

read (:mod:`~hsam.pipeline.read`) -> orient (:mod:`~hsam.pipeline.orient`) -> window (:mod:`~hsam.pipeline.window`)
-> body mask (:mod:`~hsam.pipeline.body`) -> predict, with the slab search (:mod:`~hsam.pipeline.predict`,
:mod:`~hsam.pipeline.batches`, :mod:`~hsam.pipeline.slab`) -> refine (:mod:`~hsam.pipeline.refine`) -> post-process
(:mod:`~hsam.pipeline.post`) -> checks (:mod:`~hsam.pipeline.checks`) -> write (:mod:`~hsam.pipeline.write`).

:func:`hsam.pipeline.run.segment_volume` runs them with one :class:`hsam.pipeline.options.SegmentOptions` and returns a
:class:`hsam.pipeline.result.SegmentationResult`; the reference protocol (the released H-SAM test pipeline,
:mod:`~hsam.pipeline.reference`) is the same runner with its own engine, orientation and resize stages. Nothing is
imported here, so a stage module (e.g. :mod:`~hsam.pipeline.window`, which :mod:`hsam.prompting` uses) loads alone.
"""
