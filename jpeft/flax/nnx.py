"""PEFT on a Flax NNX model jpeft did not write, without touching its code.

Functional, for your own loop (`graphdef, state = nnx.split(model)`):

    peft = jpeft.flax.nnx.PeftModel(model)                    # finds its layers
    adapter = peft.init_adapter(state, jpeft.LoraConfig(r=8, target_modules=["q"]), key=k)
    logits = peft.apply(state, ids, adapter=adapter)          # pure: jit, grad w.r.t. adapter
    state = peft.merge(state, adapter)                        # a state the plain model runs

Stateful, for `nnx.Optimizer` users:

    peft.inject(model, adapter)                 # targeted layers wrapped in place
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=jpeft.flax.nnx.AdapterParam)
    adapter = peft.adapter_of(model)            # the trained adapter, for save_pretrained

A targeted `Linear`, `LinearGeneral`, `Einsum`, `Embed` or `Conv` is replaced in its parent by an
`AdaptedLayer` that keeps the layer and the adapter's inputs for it (stacked on the layer axis for
`nnx.vmap`-made stacks, so the model's own `nnx.scan` slices them with the kernel) and runs jpeft's
op on the kernel's [out, in] view (`jpeft.flax.projection`). The model's classes are not changed:
only the instance graph holds the wrappers, and `apply` builds a fresh one from `state` each call.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jpeft import injection, ops
from jpeft import tree as jtree
from jpeft.adapter import Adapter
from jpeft.config import PeftConfig
from jpeft.flax import projection as proj
from jpeft.flax import sites as flax_sites
from jpeft.flax.sites import ParamView, Site
from jpeft.quant.formats import QuantizedTensor
from jpeft.quant.params import QuantConfig
from jpeft.sharding.adapter_specs import adapter_specs

Array = jax.Array
# Names of a top-level output layer, for `PeftModel.output_head`'s default.
HEAD_NAMES = ("lm_head", "head", "output", "unembed", "out_proj", "classifier")
LAYER_CLASSES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed, nnx.Conv)


class AdapterParam(nnx.Param):
    """A trainable adapter array of an `AdaptedLayer` (the `wrt=` filter for nnx.Optimizer)."""


class AdapterState(nnx.Variable):
    """Frozen adapter state of an `AdaptedLayer` (PiSSA's start, scalings, layer masks, keys)."""


class AdaptedLayer(nnx.Module):
    """A layer with its adapter: `layer` itself, the method's inputs in `entry`, `config`."""

    def __init__(self, layer: nnx.Module, site: Site, entry: Mapping[str, Any] | None, config):
        self.layer = layer
        self.site = nnx.static(site)
        self.config = nnx.static(config)
        self.entry = nnx.data(None if entry is None else _variables(entry))

    def __call__(self, inputs: Array, *args, **kwargs) -> Array:
        layer, site = self.layer, self.site
        kernel = getattr(layer, site.kernel_name).get_value()
        entry = (
            None
            if self.entry is None
            else jax.tree.map(lambda v: v.get_value(), self.entry, is_leaf=_is_variable)
        )
        weight = flax_sites.make_node(site, site.call_weight(kernel), entry, self.config)
        if site.kind == proj.EMBEDDING:
            out = ops.embed(inputs, weight)
            return out.astype(layer.dtype or out.dtype)
        if site.kind == proj.CONV:

            def run(x, conv_kernel, with_bias):
                graphdef, state = nnx.split(layer)
                state[site.kernel_name] = nnx.Param(conv_kernel)
                if not with_bias and layer.bias is not None:
                    state["bias"] = nnx.Param(jnp.zeros_like(layer.bias[...]))
                return nnx.merge(graphdef, state)(x, *args, **kwargs)

            view = site.view(kernel)
            return flax_sites.conv_output(site, view, weight, entry, self.config, inputs, run)
        einsum_str = kwargs.get("einsum_str", args[0] if args else None)
        projection = _projection(layer, inputs.ndim, einsum_str, "")
        bias = layer.bias[...] if layer.bias is not None else None
        stored = inputs.dtype if isinstance(kernel, QuantizedTensor) else kernel.dtype
        dtype = layer.dtype or jnp.result_type(inputs, stored, *(() if bias is None else (bias,)))
        return projection.apply(
            inputs.astype(dtype),
            weight,
            None if bias is None else bias.astype(dtype),
            site.kernel_shape,
        )


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _variables(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's arrays as nnx Variables: `pieces` trainable, the rest frozen."""
    return {
        group: jax.tree.map(AdapterParam if group == "pieces" else AdapterState, values)
        for group, values in entry.items()
    }


class PeftModel:
    """An NNX model with its adaptable layers found (`sites`), ready for any weight method.

    `skipped` names layers jpeft cannot adapt, with the reason. `output_head`: the module name
    of the layer that gives the model's output ("all-linear" leaves it out, as PEFT does);
    by default a top-level layer named one of `HEAD_NAMES`.
    """

    def __init__(self, model: nnx.Module, *, output_head: str | None = None):
        self.graphdef, state = nnx.split(model)
        params = flax_sites.flatten(state.to_pure_dict())
        found, self.skipped = [], {}
        for path, layer in nnx.iter_modules(model):
            if not isinstance(layer, LAYER_CLASSES):
                continue
            path = tuple(str(p) for p in path)
            try:
                found.append(_site(path, layer, params))
            except proj.UnsupportedLayer as error:
                self.skipped[".".join(path)] = str(error)
        self.sites: tuple[Site, ...] = tuple(found)
        self.output_head = output_head or next(
            (".".join(s.path) for s in self.sites if len(s.path) == 1 and s.path[0] in HEAD_NAMES),
            None,
        )
        # {model: (config, piece shapes, frozen state)} of the adapters `inject` put in models
        self._injected: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- PEFT's view of the params -------------------------------------------------------------

    def view(self, state: nnx.State) -> jtree.ModelView:
        """The params as jpeft's methods see a model: `<module>.weight` [out, in] per layer."""
        return self._param_view(state).tree()

    def _param_view(self, state: nnx.State) -> ParamView:
        params = nnx.state(nnx.merge(self.graphdef, state, copy=True), nnx.Param)
        return ParamView(self.sites, params.to_pure_dict(), self.output_head)

    def init_adapter(self, state: nnx.State, config: PeftConfig, *, key: Array) -> Adapter:
        """A fresh adapter for this model, initialised as PEFT does (`jpeft.init_adapter` on the
        model's view); a target naming a layer jpeft cannot adapt is an error saying why."""
        flax_sites.check_targets(config, self.sites, self.skipped)
        return injection.init_adapter(self.view(state), config, key=key)

    # -- running -------------------------------------------------------------------------------

    def apply(
        self,
        state: nnx.State,
        *args,
        adapter: Adapter | None = None,
        dropout_key: Array | None = None,
        method: str = "__call__",
        **kwargs,
    ) -> Any:
        """`model.<method>(*args, **kwargs)` of the model `state` holds, with the adapter in it
        (None: the base model; a 4-bit kernel still runs the quantized matmul). Pure: jit it and
        differentiate it with respect to `adapter`."""
        model = nnx.merge(self.graphdef, state, copy=True)
        if adapter is not None and adapter.overrides:
            view = self._param_view(state)
            changed = view.from_view(
                injection.apply_overrides(view.tree(), adapter.overrides), set(adapter.overrides)
            )
            nnx.replace_by_pure_dict(state := nnx.state(model), changed)
            nnx.update(model, state)
        self._wrap(model, adapter, dropout_key)
        return getattr(model, method)(*args, **kwargs)

    def inject(self, model: nnx.Module, adapter: Adapter) -> None:
        """Wrap the targeted layers of `model` in place, their adapter arrays as `AdapterParam`
        (trainable) and `AdapterState`; `adapter_of` reads the trained adapter back."""
        if adapter.overrides:
            raise ValueError(
                "inject keeps the adapter inside the model's layers, but this adapter also "
                f"replaces parameters ({sorted(adapter.overrides)[:3]}: modules_to_save, "
                "biases); use the functional apply(state, ..., adapter=) for it"
            )
        self._injected[model] = (
            adapter.config,
            jax.tree.map(jnp.shape, adapter.weights),
            adapter.frozen,
        )
        self._wrap(model, adapter, None)

    def adapter_of(self, model: nnx.Module) -> Adapter:
        """The adapter `inject` put in `model`, with its current (trained) values."""
        if model not in self._injected:
            raise ValueError("this model has no adapter injected by this PeftModel (inject first)")
        config, shapes, frozen = self._injected[model]
        weights: dict[str, dict[str, Array]] = {}
        for _, wrapper in nnx.iter_modules(model):
            if not isinstance(wrapper, AdaptedLayer) or wrapper.entry is None:
                continue
            site = wrapper.site
            for layer in site.layers():
                name = site.module_name(layer)
                if name not in shapes:
                    continue
                weights[name] = {
                    piece: _unpad(value[...] if layer is None else value[...][layer], shape)
                    for piece, value in wrapper.entry["pieces"].items()
                    for shape in [shapes[name][piece]]
                }
        return Adapter(config, weights, frozen=frozen)

    def _wrap(self, model, adapter, dropout_key) -> None:
        """Wrap, in `model`, every layer the adapter adapts and every 4-bit one."""
        entries = (
            {} if adapter is None else flax_sites.site_inputs(self.sites, adapter, dropout_key)
        )
        config = None if adapter is None else adapter.config
        for site in self.sites:
            entry = entries.get(site.path)
            parent = _get(model, site.path[:-1])
            layer = _get(parent, site.path[-1:])
            quantized = isinstance(getattr(layer, site.kernel_name).get_value(), QuantizedTensor)
            if entry is None and not quantized:
                continue
            _set(parent, site.path[-1], AdaptedLayer(layer, site, entry, config))

    def adapter_specs(self, state: nnx.State, adapter: Adapter, mesh: Mesh) -> Adapter:
        """The adapter's `PartitionSpec`s on `mesh`: each piece's axes split as the kernel axes
        they run along, read from the kernels' sharding metadata (`nnx.with_partitioning`)."""
        view = self._param_view(state)
        params = nnx.state(nnx.merge(self.graphdef, state, copy=True), nnx.Param)
        own = flax_sites.flatten(nnx.get_partition_spec(params).to_pure_dict())
        return adapter_specs(adapter, view.tree(), mesh, base=view.specs(own))

    # -- merge, quantize -----------------------------------------------------------------------

    def merge(self, state: nnx.State, adapter: Adapter) -> nnx.State:
        """`jpeft.merge` into the model's own state: what the unmodified model runs."""
        return self._rewrite(state, injection.merge, adapter)

    def unmerge(self, state: nnx.State, adapter: Adapter) -> nnx.State:
        """`jpeft.unmerge`: the state `merge` was given, from a merged one."""
        return self._rewrite(state, injection.unmerge, adapter)

    def _rewrite(self, state, fn, adapter) -> nnx.State:
        view = self._param_view(state)
        params = view.from_view(fn(view.tree(), adapter), flax_sites.changed_names(view, adapter))
        model = nnx.merge(self.graphdef, state, copy=True)
        params_state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(params_state, params)
        nnx.update(model, params_state)
        return nnx.state(model)

    def quantize(self, state: nnx.State, config: QuantConfig | None = None) -> nnx.State:
        """The state with every linear layer's kernel stored as 4-bit blocks of its [out, in]
        view, as bitsandbytes quantizes that layer (QLoRA); heads named in
        `config.skip_modules`, embeddings and convolutions stay in floats."""
        model = nnx.merge(self.graphdef, state, copy=True)
        for site in self.sites:
            layer = _get(model, site.path)
            kernel = getattr(layer, site.kernel_name)
            quantized = flax_sites.quantized_kernel(
                site, kernel.get_value(), config or QuantConfig()
            )
            if quantized is not None:
                kernel.value = quantized
        return nnx.state(model)


def _unpad(value: Array, shape: tuple[int, ...]) -> Array:
    return value[tuple(slice(0, size) for size in shape)]


def _get(node: Any, path: tuple[str, ...]) -> Any:
    """The module at `path` below `node` (a digit part indexes an `nnx.List` or list)."""
    for part in path:
        node = (
            node[int(part)] if part.isdigit() and not hasattr(node, part) else getattr(node, part)
        )
    return node


def _set(parent: Any, part: str, value: Any) -> None:
    if part.isdigit() and not hasattr(parent, part):
        parent[int(part)] = value
    else:
        setattr(parent, part, value)


def _site(path: tuple[str, ...], layer: nnx.Module, params) -> Site:
    """The `Site` of one layer; UnsupportedLayer when jpeft cannot adapt it."""
    where = f"{'.'.join(path)} (nnx.{type(layer).__name__})"
    kernel_name = "embedding" if isinstance(layer, nnx.Embed) else "kernel"
    stored = jtree.leaf_shape(getattr(layer, kernel_name).get_value())
    fields: dict[str, Any] = {}
    if isinstance(layer, nnx.Embed):
        kind, own_ndim = proj.EMBEDDING, 2
    elif isinstance(layer, nnx.Conv):
        kind, own_ndim = proj.CONV, len(layer.kernel_size) + 2
        fields["spatial"] = len(layer.kernel_size)
    else:
        kind = proj.LINEAR
        own_ndim = _kernel_ndim(layer)
        x_ndim = max(_contracted_count(layer), 1) + 1
        fields["projection"] = _projection(layer, x_ndim, None, where)
    extra = len(stored) - own_ndim
    if extra > 1:
        raise proj.UnsupportedLayer(
            f"{where}: its kernel {stored} carries {extra} stacked axes (nested stacks); jpeft "
            "adapts layers stacked once"
        )
    if extra == 1:
        fields["stack_at"] = flax_sites.stack_position(params, path, stored[0])
        fields["num_layers"] = stored[0]
    return Site(path, f"nnx.{type(layer).__name__}", kind, kernel_name, stored[extra:], **fields)


def _kernel_ndim(layer: nnx.Module) -> int:
    if isinstance(layer, nnx.Linear):
        return 2
    if isinstance(layer, nnx.LinearGeneral):
        return len(layer.in_features) + len(layer.out_features)
    return len(layer.kernel_shape)


def _contracted_count(layer: nnx.Module) -> int:
    if isinstance(layer, nnx.LinearGeneral):
        return len(layer.axis)
    if isinstance(layer, nnx.Einsum):
        lhs = layer.einsum_str.replace(" ", "").split("->")[0].split(",")[0]
        return len(lhs.replace("...", ""))
    return 1


def _projection(layer: nnx.Module, x_ndim: int, einsum_str: str | None, where: str):
    if isinstance(layer, nnx.Linear):
        projection = proj.dense(x_ndim)
    elif isinstance(layer, nnx.LinearGeneral):
        if layer.batch_axis:
            raise proj.UnsupportedLayer(
                f"{where}: batch_axis={dict(layer.batch_axis)} makes its kernel one weight per "
                "batch index, not one [out, in] weight; exclude it (exclude_modules)"
            )
        projection = proj.dense_general(x_ndim, layer.axis, len(layer.out_features))
    else:
        projection = proj.einsum(einsum_str or layer.einsum_str, x_ndim, len(layer.kernel_shape))
    projection.check(where)
    return projection
