"""The gpu profile's own pieces: DALI pipelines (dali_pipelines). TensorRT plans are built by
builders.tensorrt. Both import their NVIDIA library only when used, so this package imports
on any host."""
