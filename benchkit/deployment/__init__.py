"""Deployment: a pruned model in the fastest form this device runs, with what it really costs.

* :func:`benchkit.deployment.core.deploy` (``bk.deploy``): per-layer forms chosen by measurement;
* :mod:`~benchkit.deployment.forms`: the forms (dense, CSR kernels, 2:4 semi-structured on CUDA);
* :mod:`~benchkit.deployment.fused`: benchkit's own CPU kernels (``csr_linear`` for the ``fused_csr`` form,
  ``conv_stage`` for fused convolution stages);
* :mod:`~benchkit.deployment.fold`: BatchNorms folded into the convolutions before them, in every variant;
* :mod:`~benchkit.deployment.stages`: convolutions with their ReLU and max-pool as fused stages, where faster;
* :mod:`~benchkit.deployment.compiled`: the whole-model ``torch.compile`` step (``compile=True``);
* :mod:`~benchkit.deployment.layout`: the channels-last twin of a convolutional model's variants;
* :mod:`~benchkit.deployment.compact`: whole dead channels removed with Torch-Pruning;
* :mod:`~benchkit.deployment.flops`: structured FLOP counts under three named conventions;
* :mod:`~benchkit.deployment.sizes`: model sizes read from the files written in each format;
* :mod:`~benchkit.deployment.onnx_export`: ONNX export of the compacted model, checked under onnxruntime;
* :mod:`~benchkit.deployment.report`: a run's theory-versus-practice figures (``latency.enabled``).

The package is named ``deployment``, not ``deploy``: importing a submodule ``benchkit.deploy.x`` would
rebind ``benchkit.deploy`` to the package and hide the ``bk.deploy`` function. Layering: this package
builds on ``benchkit.metrics``, ``benchkit.latency`` and ``benchkit.pruning``; none of them imports it.
Submodules are imported on use, so ``import benchkit.deployment`` stays light.
"""
