"""The `stable-megatron` subcommands that work on checkpoints, data and logs: `inspect`,
`export`, `reshape`, `preprocess` and `plot` (one module each, each with `main(argv)`; the
scripts of the same names in tools/ call these). Above the training code: nothing below
imports them."""
