"""Training: pretraining and SFT with FlagAI's configuration keys (see aquila.train.config.TrainConfig)."""
