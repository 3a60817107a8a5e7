"""What the CLI tests share: the arguments of a run that takes a second on a CPU."""

#: A small run of the CLI: counting rows of 16 tokens, a 1-layer model, CPU, nothing written.
TINY = [
    "--data.corpus=counting",
    "--data.batch_mode=padded",
    "--data.seq_len=16",
    "--data.batch_size=4",
    "--data.counting_vocab=16",
    "--data.counting_length=16",
    "--data.counting_documents=64",
    "--model.arch.d_model=16",
    "--model.arch.n_layers=1",
    "--model.arch.n_heads=2",
    "--model.arch.attention=sdpa",
    "--trainer.accelerator=cpu",
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
