"""H-SAM networks: backbones, decoders, builders and checkpoint formats.

Importing this package is cheap; import the submodules for the API:

* :mod:`hsam.model.config`: ``ModelConfig``, ``load_model_config``
* :mod:`hsam.model.build`: ``build_hsam``, ``available_backbones``
* :mod:`hsam.model.registry`: ``register_backbone``, ``register_base_weights``
* :mod:`hsam.model.hsam`: ``HSAM``
* :mod:`hsam.model.checkpoint`: ``ModelCard``, ``save_model``, ``load_model``
* :mod:`hsam.model.official`: ``import_official``, ``export_official``, ``init_from_sam``
"""
