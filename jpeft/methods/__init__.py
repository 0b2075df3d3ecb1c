"""One file per PEFT method; importing this package registers them all."""

from jpeft.methods import lora  # noqa: F401
