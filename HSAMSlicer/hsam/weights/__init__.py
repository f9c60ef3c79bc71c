"""Model weights: the manifest of known models, downloads, and the models installed on this computer.

Layout under :func:`hsam.paths.hsam_home` (``$HSAM_HOME`` or ``~/.hsam``):

* ``models/<id>/model.safetensors + model.json`` — installed segmentation models (our format, see
  :mod:`hsam.model.checkpoint`): verified against the card's SHA-256 when installed and again on every load
  (:mod:`.store`).
* ``downloads/<file>`` — verified raw files from the manifest (SAM base weights, official checkpoints; :mod:`.cache`),
  with ``trusted-sha256.json`` for files that have no published hash (:mod:`.trust`).
* ``partial/`` — downloads in progress (:mod:`.download`). Nothing here is ever read as a finished file; a completed
  download is checked (size, SHA-256) and only then moved into ``downloads/`` with ``os.replace``.

One job per module, imported one way: :mod:`.manifest` (``Resources/models.json``) <- :mod:`.cache` <- :mod:`.download`
(HTTP, resume; Google Drive pages in :mod:`.drive`), :mod:`.trust`, :mod:`.store` (installed models) <-
:mod:`.official` (the authors' checkpoints converted and installed) <- :mod:`.fetch` (``hsam models download``).
Only the standard library is used for downloads (``urllib``); torch is imported only when a model is loaded.
"""
