"""GPT models for the trainer: which engine runs the layers (`fast_path`), Megatron's config
(`megatron_config`), the layer spec (`spec`) and the `GPTModel` chunks (`build`), with the
modules they swap in. Importing the package imports no Megatron: the trainer decides its engine
before it loads Megatron."""
