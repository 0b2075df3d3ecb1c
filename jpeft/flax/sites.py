"""The adaptable layers of a Flax model jpeft did not write, and its params in PEFT's view.

A `Site` is one linear-like layer (a `Dense`, `Einsum`, `Embed`, `Conv`, ... of linen or NNX),
found by `jpeft.flax.linen` / `jpeft.flax.nnx`. Its module name is its path in the model joined
with dots (`decoder.layers_0.attn.query`); a layer under a scanned (`nn.scan` / `nnx.vmap`) stack
keeps its kernel stacked on a leading axis, and gets one name per layer with the index after the
stack's own name (`decoder.blocks.3.attn.query`), as PEFT's rules (`layers_to_transform`) read it.

`ParamView` turns the model's params into the tree every jpeft method is written for: per-layer
`<module>.weight` [out, in] views of the kernels (`jpeft.flax.projection`), `<module>.bias` over
the same `out`, every other parameter under `<module>.<leaf>` as it is. `init_adapter`,
`merge` and PEFT's file names work on that view; `from_view` writes a changed view back into the
model's own tree. `site_inputs` gives what a layer's call needs to build its method's node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jpeft import ops, targeting
from jpeft import tree as jtree
from jpeft.adapter import SHARED, Adapter
from jpeft.config import PeftConfig
from jpeft.flax import projection as proj
from jpeft.injection import node_inputs
from jpeft.method import WeightMethod, method_for
from jpeft.quant.formats import QuantizedTensor, dequantize, stack
from jpeft.quant.params import QuantConfig

Array = jax.Array
Path = tuple[str, ...]
# The params entry holding a layer's adapter inputs while the model runs (see `site_inputs`).
ADAPTER_ENTRY = "jpeft_adapter"


@dataclasses.dataclass(frozen=True)
class Site:
    """One adaptable layer.

    path: the layer's path in the param tree (its kernel is `path + (kernel_name,)`);
    layer_class: its class, for messages ("linen.Dense", "nnx.Einsum"); kind: `projection.LINEAR`,
    `EMBEDDING` or `CONV`; kernel_shape: the per-layer kernel shape; projection: how a linear
    kernel views as [out, in] (None for the other kinds); spatial: a conv's window axes;
    stack_at: the index in `path` of the scanned stack the layer lies in, None if not stacked;
    num_layers: the stack's length.
    """

    path: Path
    layer_class: str
    kind: str
    kernel_name: str
    kernel_shape: tuple[int, ...]
    projection: proj.Projection | None = None
    spatial: int = 0
    stack_at: int | None = None
    num_layers: int | None = None

    def module_name(self, layer: int | None = None) -> str:
        """The module's PEFT name, with `layer`'s index after the stack's name when stacked."""
        parts = list(self.path)
        if self.stack_at is not None:
            parts.insert(self.stack_at + 1, str(layer))
        return ".".join(parts)

    def layers(self) -> list[int | None]:
        return [None] if self.stack_at is None else list(range(self.num_layers))

    def view(self, kernel: Any) -> Any:
        """The kernel (per layer or stacked) as [.., out, in]; a 4-bit kernel already is."""
        if isinstance(kernel, QuantizedTensor):
            return kernel
        if self.kind == proj.LINEAR:
            return self.projection.view(kernel)
        if self.kind == proj.CONV:
            return proj.conv_view(kernel, self.spatial)
        return kernel

    def call_weight(self, kernel: Any) -> Any:
        """The weight a layer's call runs on: a linear kernel as a `projection.KernelView` (its
        products contract the kernel as stored), else `view(kernel)`."""
        if self.kind == proj.LINEAR and not isinstance(kernel, QuantizedTensor):
            return proj.KernelView(kernel, self.projection)
        return self.view(kernel)

    def kernel_from_view(self, view: Array) -> Array:
        if self.kind == proj.LINEAR:
            return self.projection.kernel_from_view(view, self.kernel_shape)
        if self.kind == proj.CONV:
            return proj.conv_kernel_from_view(view, self.kernel_shape)
        return view

    def view_spec(self, spec: tuple) -> tuple:
        """The per-layer kernel's spec (one entry per kernel axis) as its view's (out, in) spec.

        A flattened group of kernel axes keeps the split of its first (major) axis when the
        others are not split (a split minor axis is no block split of the group: replicated)."""
        if self.kind == proj.LINEAR:
            labels = self.projection.kernel_labels
            return (
                _group_spec(spec, [labels.index(c) for c in self.projection.produced]),
                _group_spec(spec, [labels.index(c) for c in self.projection.contracted]),
            )
        if self.kind == proj.CONV:
            ndim = len(spec)
            return spec[-1], _group_spec(spec, [ndim - 2, *range(ndim - 2)])
        return spec

    def bias_spec(self, spec: tuple) -> tuple:
        """The bias's spec as the flat [out] bias's."""
        if self.kind != proj.LINEAR:
            return spec
        labels = self.projection.bias_labels
        return (_group_spec(spec, [labels.index(c) for c in self.projection.produced]),)

    def flat_bias(self, bias: Array) -> Array:
        return self.projection.flat_bias(bias) if self.kind == proj.LINEAR else bias

    def bias_from_flat(self, flat: Array, bias_shape: tuple[int, ...]) -> Array:
        if self.kind == proj.LINEAR:
            return self.projection.bias_from_flat(flat, bias_shape)
        return flat


def _group_spec(spec: tuple, axes: list[int]):
    first, *rest = axes
    return spec[first] if all(spec[i] is None for i in rest) else None


def stack_position(params: Mapping[Path, Any], path: Path, num_layers: int) -> int:
    """Where along `path` a layer's scanned stack starts: the shortest prefix under which every
    parameter carries `num_layers` on its leading axis (the module `nn.scan` / `nnx.vmap` made)."""
    for end in range(1, len(path) + 1):
        below = [leaf for p, leaf in params.items() if p[:end] == path[:end]]
        if all(jtree.leaf_shape(leaf)[:1] == (num_layers,) for leaf in below):
            return end - 1
    return len(path) - 1


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Nested dict -> {path tuple: leaf}; dicts (and Flax's FrozenDicts) are containers."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, (*prefix, str(key))))
        else:
            flat[(*prefix, str(key))] = value
    return flat


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


class ParamView:
    """The model's params (nested dicts, keyed by module path) seen as PEFT sees a model."""

    def __init__(
        self, sites: tuple[Site, ...], params: Mapping[str, Any], output_head: str | None = None
    ):
        self.sites = sites
        self.output_head = output_head
        self.flat = flatten(params)
        self._site_of = {site.path: site for site in sites}
        self._stacks = {
            site.path[: site.stack_at + 1]: site.num_layers
            for site in sites
            if site.stack_at is not None
        }

    def names(self) -> Iterator[tuple[str, Path, int | None]]:
        """(PEFT parameter name, param path, layer index or None) of every parameter."""
        for path in self.flat:
            site = self._site_of.get(path[:-1])
            leaf = {site.kernel_name: "weight"}.get(path[-1], path[-1]) if site else path[-1]
            stack = next((s for s in self._stacks if path[: len(s)] == s), None)
            if stack is None:
                yield ".".join((*path[:-1], leaf)), path, None
                continue
            for layer in range(self._stacks[stack]):
                parts = (*stack, str(layer), *path[len(stack) : -1], leaf)
                yield ".".join(parts), path, layer

    def tree(self) -> jtree.ModelView:
        """{PEFT name: per-layer value}, nested: kernels as [out, in] views, biases flat."""
        flat = {}
        embeddings = set()
        for name, path, layer in self.names():
            site = self._site_of.get(path[:-1])
            value = jtree.layer_of(self.flat[path], layer)
            if site is not None and path[-1] == site.kernel_name:
                value = site.view(value)
                if site.kind == proj.EMBEDDING:
                    embeddings.add(name.rpartition(".")[0])
            elif site is not None and path[-1] == "bias":
                value = site.flat_bias(value)
            flat[name] = value
        heads = () if self.output_head is None else (self.output_head,)
        return jtree.ModelView(jtree.unflatten(flat), embeddings, heads)

    def specs(self, own: Mapping[Path, Any]) -> dict[str, PartitionSpec]:
        """{PEFT name: its per-layer spec in the view}, from the params' own specs by path
        (Flax's `get_partition_spec`; a missing or empty spec is replicated)."""
        specs = {}
        for name, path, layer in self.names():
            spec = tuple(own.get(path) or ())
            spec += (None,) * (len(jtree.leaf_shape(self.flat[path])) - len(spec))
            spec = spec if layer is None else spec[1:]
            site = self._site_of.get(path[:-1])
            if site is not None and path[-1] == site.kernel_name:
                spec = site.view_spec(spec)
            elif site is not None and path[-1] == "bias":
                spec = site.bias_spec(spec)
            specs[name] = PartitionSpec(*spec)
        return specs

    def from_view(self, view: Mapping[str, Any], changed: set[str] | None = None) -> dict:
        """The model's params with the view's values written back (only names in `changed`,
        when given): kernels from their views, stacked leaves restacked."""
        flat_view = jtree.flatten(view)
        updates: dict[Path, dict[int | None, Any]] = {}
        for name, path, layer in self.names():
            if changed is not None and name not in changed:
                continue
            updates.setdefault(path, {})[layer] = flat_view[name]
        out = dict(self.flat)
        for path, per_layer in updates.items():
            site = self._site_of.get(path[:-1])
            old = self.flat[path]
            if isinstance(old, QuantizedTensor):  # a merged 4-bit kernel comes back in floats
                old = site.kernel_from_view(dequantize(old))
            values = {}
            for layer, value in per_layer.items():
                shape = jtree.leaf_shape(jtree.layer_of(old, layer))
                if site is not None and path[-1] == site.kernel_name:
                    value = site.kernel_from_view(value)
                elif site is not None and path[-1] == "bias":
                    value = site.bias_from_flat(value, shape)
                values[layer] = jnp.asarray(value).astype(jnp.asarray(old).dtype)
            if None in values:
                out[path] = values[None]
            else:
                stacked = jnp.asarray(old)
                for layer, value in values.items():
                    stacked = stacked.at[layer].set(value)
                out[path] = stacked
        return unflatten(out)


def site_inputs(
    sites: tuple[Site, ...], adapter: Adapter, dropout_key: Array | None
) -> dict[Path, dict[str, Any]]:
    """{site path: what the layer's call needs to build its node}, for the sites the adapter
    adapts: `pieces`, `frozen`, `constants`, `active` (as `jpeft.injection.node_inputs` gives
    them, stacked on the layer axis for a scanned layer, state shared by all modules repeated per
    layer so the scan slices it too) and `dropout` (raw key data, one key per layer) while
    training."""
    method = check_weight_method(adapter.config)
    wanted = set(adapter.weights)
    entries = {}
    for index, site in enumerate(sites):
        layer_names = {
            layer: site.module_name(layer)
            for layer in site.layers()
            if site.module_name(layer) in wanted
        }
        if not layer_names:
            continue
        base_shape = (site.num_layers,) * (site.stack_at is not None) + site_view_shape(site)
        pieces, frozen, constants, active = node_inputs(
            method, adapter, base_shape, layer_names, site.num_layers
        )
        entry = {"pieces": pieces, "frozen": frozen, "constants": constants}
        if active is not None:
            entry["active"] = active
            shared = adapter.frozen.get(SHARED, {})
            entry["frozen"] = {
                k: jnp.broadcast_to(v, (site.num_layers, *v.shape)) if k in shared else v
                for k, v in frozen.items()
            }
        if dropout_key is not None:
            key = jax.random.fold_in(dropout_key, index)
            if site.num_layers is not None and site.stack_at is not None:
                key = jax.random.split(key, site.num_layers)
            entry["dropout"] = jax.random.key_data(key)
        entries[site.path] = entry
    known = [site.module_name(layer) for site in sites for layer in site.layers()]
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ValueError(
            f"the adapter adapts {unknown[:3]}, which this model does not have as adaptable "
            f"layers (its layers look like {known[:3]}); was the adapter made for another model?"
        )
    return entries


def site_view_shape(site: Site) -> tuple[int, ...]:
    """The per-layer [out, in] (or [vocab, dim]) shape of the site's kernel view."""
    kernel = jax.ShapeDtypeStruct(site.kernel_shape, jnp.float32)
    return tuple(jax.eval_shape(site.view, kernel).shape)


def make_node(site: Site, weight: Any, entry: Mapping[str, Any] | None, config: Any) -> Any:
    """The weight a layer's call runs: its view `weight` itself, or its method's node built from
    the layer's `entry` (`site_inputs`, sliced to this layer by the model's own scan)."""
    if entry is None:
        return weight
    method: WeightMethod = method_for(config)
    key = entry.get("dropout")
    key = None if key is None else jax.random.wrap_key_data(key)
    return method.make_node(
        weight,
        dict(entry["pieces"]),
        dict(entry["frozen"]),
        dict(entry["constants"]),
        entry.get("active"),
        key,
        config,
    )


def check_weight_method(config: PeftConfig) -> WeightMethod:
    """The config's method; ValueError for a prompt-learning one, which needs the model's own
    embedding input and attention (jpeft's models take it; a Flax model's code would have to)."""
    method = method_for(config)
    if method.is_prompt_learning:
        raise ValueError(
            f"{config.peft_type} adds virtual tokens or an attention prefix, which a Flax model "
            "jpeft did not write has no input for; jpeft.flax runs weight methods (LoRA, IA3, "
            "...), and jpeft.models' own models run prompt methods"
        )
    return method


def check_targets(config: PeftConfig, sites: tuple[Site, ...], skipped: Mapping[str, str]) -> None:
    """ValueError when `config` is a prompt method, when the model has no adaptable layer, or
    when it targets a layer jpeft cannot adapt (`skipped`: name -> why)."""
    check_weight_method(config)
    if not sites:
        raise ValueError(
            "jpeft found no Flax Dense / DenseGeneral / Einsum / Embed / Conv (linen) or Linear "
            "/ LinearGeneral / Einsum / Embed / Conv (NNX) layer in this model"
            + (f" it can adapt ({sorted(skipped)})" if skipped else "")
            + "; projections written as a raw self.param + jnp.einsum in the model's own "
            "modules are not Flax layers and cannot be intercepted"
        )
    targets = getattr(config, "target_modules", None)
    if targets is None:
        return
    for name, reason in skipped.items():
        if targeting.matches_target(config, jtree.ModuleRef(name, name, None, "linear", ())):
            raise ValueError(f"target_modules={targets!r} names {name!r}, but {reason}")


def changed_names(view: ParamView, adapter: Adapter) -> set[str]:
    """The view names a merge of `adapter` changes: its modules' weights and biases, overrides,
    and every 4-bit kernel (`jpeft.merge` gives a float tree, which the plain model runs)."""
    modules = set(adapter.weights)
    names = {
        name
        for name, path, _ in view.names()
        if name.rpartition(".")[0] in modules or isinstance(view.flat[path], QuantizedTensor)
    }
    return names | set(adapter.overrides)


def quantized_kernel(site: Site, kernel: Array, config: QuantConfig) -> QuantizedTensor | None:
    """The kernel's [out, in] view in 4-bit blocks, layer by layer when stacked (each layer as
    bitsandbytes quantizes that `nn.Linear`), or None for a kernel `config` leaves in floats
    (embeddings, convolutions, skipped heads, already quantized)."""
    first = site.module_name(0 if site.stack_at is not None else None)
    if (
        site.kind != proj.LINEAR
        or isinstance(kernel, QuantizedTensor)
        or not config.quantizes(first, site_view_shape(site))
    ):
        return None
    view = site.view(kernel)
    if site.stack_at is None:
        return config.quantize(view, first)
    return stack([config.quantize(view[i], site.module_name(i)) for i in range(len(view))])


# The dropout fields of methods whose change is additive and whose dropout acts on the adapter
# branch's input (LoRA's `lora_A(dropout(x))`): on a convolution, jpeft runs that branch apart.
INPUT_DROPOUT_FIELDS = ("lora_dropout", "vera_dropout")


def conv_output(
    site: Site,
    view: Any,
    node: Any,
    entry: Mapping[str, Any] | None,
    config: PeftConfig | None,
    x: Array,
    run: Callable[[Array, Array, bool], Array],
) -> Array:
    """A convolution's output with its adapted kernel: `run(x, kernel, with_bias)` runs the
    layer's own conv. The adapter's change is folded into the kernel (exact); while training a
    method with input dropout, the change runs as a second conv on the dropped-out input, as
    PEFT's LoRA `Conv2d` does (`base(x) + B(A(dropout(x)))`)."""
    base = ops.as_array(view)
    if entry is None:
        return run(x, site.kernel_from_view(base), True)
    merged = node.merged_weight()
    rate = next((getattr(config, f) for f in INPUT_DROPOUT_FIELDS if hasattr(config, f)), 0.0)
    if entry.get("dropout") is None or not rate:
        return run(x, site.kernel_from_view(merged), True)
    key = jax.random.wrap_key_data(entry["dropout"])
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    dropped = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
    delta = site.kernel_from_view(merged - base)
    return run(x, site.kernel_from_view(base), True) + run(dropped, delta, False)
