"""Problems and their loaders, the prompt sampler, packing, chat templates and the embedded toy task."""
