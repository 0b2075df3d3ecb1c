"""`jpeft finetune`: the data pipeline and the fine-tuning job behind the command."""
