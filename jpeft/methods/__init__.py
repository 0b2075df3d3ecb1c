"""One file per PEFT method; importing this package registers them all."""

from jpeft.methods import (  # noqa: F401
    ia3,
    lora,  # noqa: F401
    p_tuning,
    prefix_tuning,
    prompt_tuning,
)
