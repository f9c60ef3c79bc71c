"""Prompted segmentation (issue 26): boxes and +/- points on axial slices -> organ masks on the CT grid.

LiteMedSAM's prompt encoder and mask decoder (:mod:`hsam.prompting.decoder`) run on TinyViT image embeddings
(:mod:`hsam.prompting.embedding`, cached per slice); :mod:`hsam.prompting.geometry` maps prompt coordinates (voxel
index, RAS or LPS mm) onto the canonical slice array; :mod:`hsam.prompting.session` keeps one volume's masks and
:mod:`hsam.prompting.propagation` carries a mask to neighbouring slices; :mod:`hsam.prompting.prompt_file` reads the
JSON prompt files of ``hsam prompt``; :mod:`hsam.prompting.refine` is the automatic refinement stage of
``hsam segment``. Qt-free: the Slicer module and the CLI both use it.
"""
