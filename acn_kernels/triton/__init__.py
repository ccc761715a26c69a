"""The Triton backend: one module per op (:mod:`.masked_topk`, :mod:`.mixture`) and the launch
helpers they share (:mod:`.launch`). Imported on first use by :mod:`acn_kernels.ops`, so that
``import acn_kernels`` never needs Triton."""
