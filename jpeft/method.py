"""What a PEFT method is in jpeft: two protocols with defaults, and the registry.

A method is one class in one file of `jpeft/methods/` (or anywhere: `register` works from outside
the package), decorated with `@register`:

- `WeightMethod`: methods that change linear or embedding weights (LoRA, IA3, LoHa, ...). They
  keep pieces per Hugging Face module (`adapter.weights[module][piece]`), build the node that
  `jpeft.ops.linear` / `ops.embed` run (`make_node`), say which base axis each piece follows
  (`piece_axes`, for sharding) and save one safetensors key per piece.
- `PromptMethod`: methods that add virtual tokens or an attention prefix (prompt tuning,
  p-tuning, prefix tuning). They keep an encoder and give the model a `Prompt`.

Everything outside the method's file reads the registry: the public config exports
(`jpeft.LoraConfig`, ...), `load_pretrained` (by `peft_type`), `save_pretrained` (the method's
`to_file`), sharding (`piece_axes`), the train step (`regularizer`, `wrap_optimizer`), and
`jpeft finetune --method` (the method's `name`, `default_lr` and `job_config`). A method that is
not registered is an error everywhere, never a fall-through.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter import PROMPT_ENCODER, Adapter, Prompt
from jpeft.config import PeftConfig

if TYPE_CHECKING:
    import optax

Array = jax.Array
Pieces = dict[str, Array]
# The safetensors key prefix of every tensor PEFT saves for a causal LM.
PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What `jpeft finetune` tells a method to build its config from (`job_config`).

    model_type: `config.model_type` ("llama", ...); num_layers: decoder layers; train_layers: the
    layer indices the job trains (the top 40% by default), None for all; r, lora_alpha,
    lora_dropout: the `--r`/`--lora-alpha`/`--lora-dropout` options (rank, alpha and dropout of
    the low-rank family); target_modules: `--target-modules` (names, a regex, "all-linear") or
    None for the method's default; virtual_tokens: `--virtual-tokens`; instruction: the task's
    instruction text; model_path: the model file or directory (also its tokenizer); steps: the
    optimizer steps of the run (AdaLoRA's budget schedule needs them); common: config fields every
    method gets (task_type, base_model_name_or_path).
    """

    model_type: str
    num_layers: int
    train_layers: list[int] | None
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: str | list[str] | None
    virtual_tokens: int
    instruction: str
    model_path: str
    steps: int
    common: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class JobOptionError(ValueError):
    """A `jpeft finetune` option that does not fit the chosen method."""


class Method(ABC):
    """What every method declares; subclass `WeightMethod` or `PromptMethod`, not this.

    peft_type: PEFT's name ("LORA"); name: `jpeft finetune --method` name ("lora");
    config_class: the config dataclass (PEFT's class name, fields and defaults);
    default_lr: the job's peak learning rate for its short runs; job_help: one line for
    `jpeft finetune --help`.
    piece_axes: {piece: per piece axis, the base weight axis it runs along (0 = out, 1 = in, HF
    orientation [out, in]) or None}; sharding splits a piece as its base axis is split (LoRA's A
    [r, in] is (None, 1)); undeclared pieces (and prompt encoders) are replicated.
    """

    peft_type: ClassVar[str]
    name: ClassVar[str]
    config_class: ClassVar[type[PeftConfig]]
    default_lr: ClassVar[float] = 1e-3
    job_help: ClassVar[str] = ""
    is_prompt_learning: ClassVar[bool] = False
    piece_axes: ClassVar[Mapping[str, tuple[int | None, ...]]] = {}

    @abstractmethod
    def init_adapter(self, params: Any, config: PeftConfig, key: Array, model: Any) -> Adapter:
        """A fresh adapter for `params`, initialised as PEFT does."""

    @abstractmethod
    def to_file(self, adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(adapter_config.json contents, {safetensors key: array}) in PEFT's format."""

    @abstractmethod
    def from_file(
        self, config: PeftConfig, tensors: Mapping[str, np.ndarray], params: Any, source: str
    ) -> Adapter:
        """The adapter a PEFT file holds; `params` only for methods whose file needs the base."""

    @abstractmethod
    def job_config(self, job: JobSpec) -> PeftConfig:
        """The config `jpeft finetune --method <name>` trains; JobOptionError for options that do
        not fit this method."""

    def regularizer(self, adapter: Adapter) -> Array | None:
        """A term the train step adds to the loss (AdaLoRA's orthogonality), or None."""
        return None

    def wrap_optimizer(
        self, config: PeftConfig, optimizer: optax.GradientTransformation
    ) -> optax.GradientTransformation:
        """The optimizer the train step runs for this method: `optimizer` itself, or one that also
        updates the method's training state (AdaLoRA's rank allocator) after each step."""
        return optimizer

    def finish_training(self, adapter: Adapter, opt_state: Any) -> Adapter:
        """The adapter to save after training with `opt_state` (AdaLoRA: its final ranks)."""
        return adapter


class WeightMethod(Method):
    """A method that changes weights, keeping pieces per Hugging Face module.

    piece_names: the PEFT names of its per-module pieces (`"lora_A.weight"`, `"ia3_l"`), as they
    appear after the module name in the safetensors keys.
    """

    piece_names: ClassVar[tuple[str, ...]] = ()
    # Whether `jpeft.unmerge` can give back the base weights from merged params; False for a
    # method whose merge replaces base leaves by its trained copies (LN tuning): unmerge refuses.
    merge_is_invertible: ClassVar[bool] = True

    @abstractmethod
    def make_node(
        self,
        base: Any,
        pieces: Pieces,
        frozen: Pieces,
        constants: Mapping[str, Array],
        active: Array | None,
        dropout_key: Array | None,
        config: PeftConfig,
    ) -> Any:
        """The adapted weight `jpeft.ops.linear` / `ops.embed` run for one module.

        Every array may carry a leading stacked-layer axis [L]: base [L, out, in], pieces
        zero-padded to the largest shape over layers; `constants` are the per-module scalars of
        `module_constants` ([L] when stacked); `active` a bool mask [L] of the layers that have
        the adapter, or None; `dropout_key` a PRNG key (split per layer when stacked) while
        training, else None. The node defines `linear(x, bias)`, `embed(ids)`,
        `merged_weight()`, `unmerged_weight()` and optionally `merged_bias(b)`/`unmerged_bias(b)`.
        """

    def module_constants(self, config: PeftConfig, module: str, pieces: Pieces) -> dict[str, float]:
        """Per-module scalars the node needs (LoRA's scaling), {} by default."""
        return {}

    def check_shapes(
        self, config: PeftConfig, module: str, base_shape: tuple[int, ...], pieces: Pieces
    ) -> None:
        """ValueError naming the module and both shapes when `pieces` do not fit a base weight of
        `base_shape` ([out, in] for a linear layer, [vocab, dim] for an embedding)."""

    def check_file_pieces(
        self, config: PeftConfig, module: str, pieces: Mapping[str, np.ndarray], source: str
    ) -> None:
        """ValueError naming `source`, the module and the piece when the pieces an adapter file
        holds for `module` do not fit `config` (missing or extra pieces, ranks other than the
        config's), before any model is seen; `check_shapes` checks them against the model."""

    def to_file(self, adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """`base_model.model.<module>.<piece>` per piece; overrides under their own names
        (trainable biases of targeted modules as `<module>.base_layer.bias`, as PEFT)."""
        tensors = {
            f"{PREFIX}{module}.{piece}": value
            for module, pieces in adapter.weights.items()
            for piece, value in pieces.items()
        }
        tensors.update(override_tensors(adapter))
        return adapter.config.to_dict(), tensors

    def from_file(
        self, config: PeftConfig, tensors: Mapping[str, np.ndarray], params: Any, source: str
    ) -> Adapter:
        """Keys ending in one of `piece_names` are pieces of the module before it, checked against
        the config (`check_file_pieces`); the other keys are copies of model parameters
        (`parameter_copy`), except a targeted embedding's `base_layer.weight`, the base's own
        table (skipped)."""
        pieces: dict[str, dict[str, np.ndarray]] = {}
        others = []
        for key in tensors:
            name = key.removeprefix(PREFIX)
            piece = next((p for p in self.piece_names if name.endswith("." + p)), None)
            if piece is not None:
                pieces.setdefault(name[: -len(piece) - 1], {})[piece] = tensors[key]
            elif not name.endswith(".base_layer.weight"):
                others.append(key)
        for module, module_pieces in pieces.items():
            self.check_file_pieces(config, module, module_pieces, source)
        overrides = {}
        for key in others:
            parameter = parameter_copy(key.removeprefix(PREFIX), pieces.keys())
            if parameter is None:
                raise ValueError(
                    f"{source}: unknown tensor {key!r} in a {self.peft_type} adapter file: it is "
                    f"neither a piece ({', '.join(self.piece_names)}) of a module nor a copy of a "
                    "model parameter (`<module>.weight` / `.bias` of a module the adapter does not "
                    "adapt, or an adapted module's `base_layer.bias`); was the file written for "
                    "another method, or a key renamed?"
                )
            overrides[parameter] = jnp.asarray(tensors[key])
        weights = {
            module: {piece: jnp.asarray(value) for piece, value in module_pieces.items()}
            for module, module_pieces in pieces.items()
        }
        return Adapter(config, weights, overrides)


def parameter_copy(name: str, adapted: Collection[str]) -> str | None:
    """The model parameter a non-piece tensor of a weight method's file replaces, as PEFT loads
    it: `<module>.weight` / `<module>.bias` of a module outside the `adapted` ones (modules_to_save
    copies, biases, resized embeddings), or `<module>.bias` for an adapted module's
    `<module>.base_layer.bias` (a trained bias). None for anything else, which PEFT would not
    load."""
    module, _, leaf = name.rpartition(".")
    if module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
        return f"{module}.bias" if leaf == "bias" and module in adapted else None
    parts = module.split(".")
    inside = any(".".join(parts[:i]) in adapted for i in range(1, len(parts) + 1))
    return name if leaf in ("weight", "bias") and not inside else None


def override_tensors(adapter: Adapter) -> dict[str, Any]:
    """The safetensors entries of `adapter.overrides` (modules_to_save copies, trained biases)."""
    tensors = {}
    for name, value in adapter.overrides.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "bias" and module in adapter.weights:
            tensors[f"{PREFIX}{module}.base_layer.bias"] = value
        else:
            tensors[f"{PREFIX}{name}"] = value
    return tensors


class PromptMethod(Method):
    """A method that adds virtual tokens or an attention prefix and changes no weight.

    Its encoder lives under `adapter.weights[PROMPT_ENCODER]` with PEFT's parameter names. PEFT
    saves the encoder's output alone (`prompt_embeddings`); a loaded adapter holds it as
    `embedding.weight` and uses it as is, as PEFT does in inference mode.
    """

    is_prompt_learning: ClassVar[bool] = True
    SAVED_KEY: ClassVar[str] = "prompt_embeddings"
    # The config fields `saved_shape` reads (named when a file's tensor does not fit them).
    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "num_virtual_tokens",
        "num_transformer_submodules",
        "token_dim",
    )

    @abstractmethod
    def prompt(self, adapter: Adapter, dropout_key: Array | None) -> Prompt:
        """What the model puts before the inputs (see `jpeft.adapter.Prompt`)."""

    @abstractmethod
    def prompt_embeddings(self, adapter: Adapter) -> Array:
        """[T, X]: what PEFT saves (the encoder's output)."""

    def to_file(self, adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        tensors = {self.SAVED_KEY: self.prompt_embeddings(adapter)}
        tensors.update(override_tensors(adapter))
        return adapter.config.to_dict(), tensors

    def saved_shape(self, config: PeftConfig) -> tuple[int | None, int | None]:
        """The shape PEFT saves `SAVED_KEY` in, None where the config leaves a size open:
        [num_virtual_tokens * num_transformer_submodules, token_dim] (PEFT's prompt tokens
        cover every transformer submodule)."""
        rows = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
        return rows, config.token_dim

    def from_file(
        self, config: PeftConfig, tensors: Mapping[str, np.ndarray], params: Any, source: str
    ) -> Adapter:
        """The one tensor PEFT saves, of the shape the config gives (`saved_shape`)."""
        if set(tensors) != {self.SAVED_KEY}:
            raise ValueError(
                f"{source}: a {config.peft_type} adapter file holds one tensor, "
                f"{self.SAVED_KEY!r}; found {sorted(tensors)}"
            )
        got, want = np.shape(tensors[self.SAVED_KEY]), self.saved_shape(config)
        if not shape_fits(got, want):
            fields = ", ".join(f"{f}={getattr(config, f)!r}" for f in self.SHAPE_FIELDS)
            raise ValueError(
                f"{source}: {self.SAVED_KEY} has shape {got}, but adapter_config.json's {fields} "
                f"give shape {shown_shape(want)}; was the file written with another "
                "adapter_config.json?"
            )
        embedding = {"embedding.weight": jnp.asarray(tensors[self.SAVED_KEY])}
        return Adapter(config, {PROMPT_ENCODER: embedding})


def shape_fits(got: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    """Whether shape `got` is `want`, None in `want` standing for any size."""
    return len(got) == len(want) and all(
        w is None or w == g for w, g in zip(want, got, strict=True)
    )


def shown_shape(want: tuple[int | None, ...], open_size: str = "any") -> str:
    """`want` for messages, `open_size` where it is None: (4, 'any')."""
    return str(tuple(open_size if w is None else w for w in want))


# ---------------------------------------------------------------------------------------------
# the registry

_BY_TYPE: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method (one instance of `cls`) under its `peft_type` and
    `name`, and mark its `config_class` with the `peft_type`. Re-registering a peft_type
    replaces the method (so a module can be reloaded); a `name` taken by another peft_type
    is refused."""
    for attribute in ("peft_type", "name", "config_class"):
        if not getattr(cls, attribute, None):
            raise TypeError(f"method class {cls.__name__} must set {attribute}")
    clash = next(
        (m for m in _BY_TYPE.values() if m.name == cls.name and m.peft_type != cls.peft_type),
        None,
    )
    if clash is not None:
        raise ValueError(
            f"method name {cls.name!r} of {cls.__name__} is already taken by "
            f"{type(clash).__name__} (peft_type {clash.peft_type!r}); choose another name"
        )
    cls.config_class.peft_type = cls.peft_type
    _BY_TYPE[cls.peft_type] = cls()
    return cls


def registered() -> dict[str, Method]:
    """{method name: method} of every registered method, in registration order."""
    return {method.name: method for method in _BY_TYPE.values()}


def method_for(config: PeftConfig | str) -> Method:
    """The method of a config (or of a `peft_type` string)."""
    peft_type = config if isinstance(config, str) else config.peft_type
    if peft_type not in _BY_TYPE:
        raise ValueError(
            f"no jpeft method is registered for peft_type {peft_type!r}; registered: "
            f"{sorted(_BY_TYPE)}"
        )
    return _BY_TYPE[peft_type]


def method_named(name: str) -> Method:
    """The method `jpeft finetune --method <name>` trains; ValueError listing the names."""
    methods = registered()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; choose from {list(methods)}")
    return methods[name]


def config_from_dict(data: Mapping[str, Any], source: str = "config") -> PeftConfig:
    """PEFT's adapter_config.json contents as the registered method's config."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: holds a {type(data).__name__}, not a JSON object")
    if "peft_type" not in data:
        raise ValueError(f"{source}: no 'peft_type' key; is this a PEFT adapter_config.json?")
    peft_type = data["peft_type"]
    if not isinstance(peft_type, str) or peft_type not in _BY_TYPE:
        raise ValueError(
            f"{source}: unknown peft_type {peft_type!r}; jpeft reads {sorted(_BY_TYPE)}"
        )
    return _BY_TYPE[peft_type].config_class.from_dict(data, source)


def optimizer_for(
    optimizer: optax.GradientTransformation, adapter: Adapter
) -> optax.GradientTransformation:
    """`optimizer` as the adapter's method runs it (`Method.wrap_optimizer`)."""
    return method_for(adapter.config).wrap_optimizer(adapter.config, optimizer)
