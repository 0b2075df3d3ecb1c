"""PEFT on a Flax linen model jpeft did not write, without touching its code.

    model = MyTransformer(...)                       # any linen module
    variables = model.init(key, ids)
    peft = jpeft.flax.linen.PeftModel(model, variables, ids)   # finds its layers (one trace)
    adapter = peft.init_adapter(variables, jpeft.LoraConfig(r=8, target_modules=["query"]), key=k)
    logits = peft.apply(variables, ids, adapter=adapter)       # == model.apply(merged, ids)
    merged = peft.merge(variables, adapter)                    # variables the plain model runs
    jpeft.save_pretrained(adapter, "out/")

The model runs through `flax.linen.intercept_methods`: each `Dense`, `DenseGeneral`, `Einsum`,
`Embed` and `Conv` call is answered by jpeft's op on the layer's [out, in] kernel view, with the
adapter's method node in place of the weight (`jpeft.flax.projection`). The adapter's inputs for a
layer travel in the layer's own `params` scope (under `sites.ADAPTER_ENTRY`), so `nn.scan`,
`nn.vmap` and `nn.remat` slice and carry them exactly as they do the kernel. The adapter stays a
separate pytree argument: `jax.grad` of `peft.apply` with respect to it gives adapter-sized
gradients only, and a 4-bit kernel (`peft.quantize`) runs the quantized matmul whose backward keeps
no float weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from jax.sharding import Mesh

from jpeft import injection, ops
from jpeft import tree as jtree
from jpeft.adapter import Adapter
from jpeft.config import PeftConfig
from jpeft.flax import projection as proj
from jpeft.flax import sites as flax_sites
from jpeft.flax.sites import ADAPTER_ENTRY, ParamView, Site
from jpeft.quant.formats import QuantizedTensor
from jpeft.quant.params import QuantConfig
from jpeft.sharding.adapter_specs import adapter_specs

Array = jax.Array
LAYER_CLASSES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed, nn.Conv)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One adaptable layer's call, as the tracing pass sees it."""

    module: nn.Module
    x_ndim: int
    kernel_shape: tuple[int, ...]
    einsum_str: str | None


class PeftModel:
    """A linen module with its adaptable layers found (`sites`), ready for any weight method.

    `variables` and `example_args` / `example_kwargs` are what `module.apply` takes; the model is
    traced once (`jax.eval_shape`, nothing computed) to see which layers it calls at which paths.
    `skipped` names layers jpeft cannot adapt, with the reason.
    """

    def __init__(
        self,
        module: nn.Module,
        variables: Mapping[str, Any],
        *example_args,
        output_head: str | None = None,
        **example_kwargs,
    ):
        self.module = module
        calls: dict[tuple[str, ...], _Call] = {}
        outputs: dict[tuple[str, ...], Any] = {}

        def record(next_fun, args, kwargs, context):
            layer = context.module
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(layer, LAYER_CLASSES):
                own = meta.unbox(layer.variables.get("params", {}))
                kernel_name = "embedding" if isinstance(layer, nn.Embed) else "kernel"
                einsum_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
                calls[layer.path] = _Call(
                    layer, jnp.ndim(args[0]), jtree.leaf_shape(own[kernel_name]), einsum_str
                )
                outputs[layer.path] = out
            return out

        heads = []

        def run(variables):
            result = module.apply(variables, *example_args, **example_kwargs)
            returned = {id(leaf) for leaf in jax.tree.leaves(result)}
            heads.extend(path for path, out in outputs.items() if id(out) in returned)
            return result

        with nn.intercept_methods(record):
            jax.eval_shape(run, variables)
        params = flax_sites.flatten(meta.unbox(variables["params"]))
        found, self.skipped = [], {}
        for path, call in calls.items():
            try:
                found.append(_site(path, call, params))
            except proj.UnsupportedLayer as error:
                self.skipped[".".join(path)] = str(error)
        self.sites: tuple[Site, ...] = tuple(found)
        self._by_path = {site.path: site for site in self.sites}
        # The layer whose output the model returns ("all-linear" leaves it out, as PEFT does).
        self.output_head = output_head or (".".join(heads[0]) if len(heads) == 1 else None)

    # -- PEFT's view of the params -------------------------------------------------------------

    def view(self, variables: Mapping[str, Any]) -> jtree.ModelView:
        """The params as jpeft's methods see a model: `<module>.weight` [out, in] per layer."""
        return self._param_view(variables).tree()

    def _param_view(self, variables: Mapping[str, Any]) -> ParamView:
        return ParamView(self.sites, meta.unbox(variables["params"]), self.output_head)

    def init_adapter(
        self, variables: Mapping[str, Any], config: PeftConfig, *, key: Array
    ) -> Adapter:
        """A fresh adapter for this model, initialised as PEFT does (`jpeft.init_adapter` on the
        model's view); a target naming a layer jpeft cannot adapt is an error saying why."""
        flax_sites.check_targets(config, self.sites, self.skipped)
        return injection.init_adapter(self.view(variables), config, key=key)

    # -- running -------------------------------------------------------------------------------

    def apply(
        self,
        variables: Mapping[str, Any],
        *args,
        adapter: Adapter | None = None,
        dropout_key: Array | None = None,
        **kwargs,
    ) -> Any:
        """`module.apply(variables, *args, **kwargs)` with the adapter in the model (None: the
        base model; a 4-bit kernel still runs the quantized matmul). `dropout_key` turns on the
        adapter's dropout (the model's own dropout keeps taking `rngs=` as usual)."""
        params = meta.unbox(variables["params"])
        config = None
        if adapter is not None:
            config = adapter.config
            if adapter.overrides:
                view = ParamView(self.sites, params)
                params = view.from_view(
                    injection.apply_overrides(view.tree(), adapter.overrides),
                    set(adapter.overrides),
                )
            entries = flax_sites.site_inputs(self.sites, adapter, dropout_key)
            for path, entry in entries.items():
                params = _set_entry(params, path, entry)
        interceptor = _Interceptor(self._by_path, config)
        with nn.intercept_methods(interceptor):
            return self.module.apply({**variables, "params": params}, *args, **kwargs)

    def adapter_specs(self, variables: Mapping[str, Any], adapter: Adapter, mesh: Mesh) -> Adapter:
        """The adapter's `PartitionSpec`s on `mesh`: each piece's axes split as the kernel axes
        they run along, read from the model's `nn.with_partitioning` annotations (LoRA's A
        [r, in] follows the kernel's input axes, B [out, r] its output axes; `jpeft.sharding`)."""
        view = self._param_view(variables)
        own = flax_sites.flatten(nn.get_partition_spec(variables)["params"])
        return adapter_specs(adapter, view.tree(), mesh, base=view.specs(own))

    # -- merge, quantize -----------------------------------------------------------------------

    def merge(self, variables: Mapping[str, Any], adapter: Adapter) -> dict[str, Any]:
        """`jpeft.merge` into the model's own variables: what the unmodified module runs."""
        view = self._param_view(variables)
        merged = injection.merge(view.tree(), adapter)
        return {
            **variables,
            "params": view.from_view(merged, flax_sites.changed_names(view, adapter)),
        }

    def unmerge(self, variables: Mapping[str, Any], adapter: Adapter) -> dict[str, Any]:
        """`jpeft.unmerge`: the variables `merge` was given, from merged ones."""
        view = self._param_view(variables)
        original = injection.unmerge(view.tree(), adapter)
        return {
            **variables,
            "params": view.from_view(original, flax_sites.changed_names(view, adapter)),
        }

    def quantize(
        self, variables: Mapping[str, Any], config: QuantConfig | None = None
    ) -> dict[str, Any]:
        """The variables with every linear layer's kernel stored as 4-bit blocks of its [out, in]
        view, as bitsandbytes quantizes that layer (QLoRA); heads named in
        `config.skip_modules`, embeddings and convolutions stay in floats."""
        params = flax_sites.flatten(meta.unbox(variables["params"]))
        for site in self.sites:
            kernel_path = (*site.path, site.kernel_name)
            quantized = flax_sites.quantized_kernel(
                site, params[kernel_path], config or QuantConfig()
            )
            if quantized is not None:
                params[kernel_path] = quantized
        return {**variables, "params": flax_sites.unflatten(params)}


def _site(path: tuple[str, ...], call: _Call, params: Mapping[tuple[str, ...], Any]) -> Site:
    """The `Site` of one recorded call; UnsupportedLayer when jpeft cannot adapt it."""
    layer = call.module
    where = f"{'.'.join(path)} ({type(layer).__name__})"
    kernel_name = "embedding" if isinstance(layer, nn.Embed) else "kernel"
    stored = jtree.leaf_shape(params[(*path, kernel_name)])
    extra = len(stored) - len(call.kernel_shape)
    if extra > 1:
        raise proj.UnsupportedLayer(
            f"{where}: its kernel {stored} carries {extra} stacked axes (nested scans); jpeft "
            "adapts layers stacked once"
        )
    fields: dict[str, Any] = {}
    if isinstance(layer, nn.Embed):
        kind = proj.EMBEDDING
    elif isinstance(layer, nn.Conv):
        kind, fields["spatial"] = proj.CONV, len(call.kernel_shape) - 2
    else:
        kind = proj.LINEAR
        fields["projection"] = _projection(layer, call, where)
    if extra:
        num_layers = stored[0]
        fields["stack_at"] = flax_sites.stack_position(params, path, num_layers)
        fields["num_layers"] = num_layers
    return Site(
        path, f"linen.{type(layer).__name__}", kind, kernel_name, call.kernel_shape, **fields
    )


def _projection(layer: nn.Module, call: _Call, where: str) -> proj.Projection:
    if isinstance(layer, nn.Dense):
        projection = proj.dense(call.x_ndim)
    elif isinstance(layer, nn.DenseGeneral):
        if layer.batch_dims:
            raise proj.UnsupportedLayer(
                f"{where}: batch_dims={layer.batch_dims} makes its kernel one weight per batch "
                "index, not one [out, in] weight; exclude it (exclude_modules)"
            )
        axis = layer.axis if isinstance(layer.axis, tuple) else (layer.axis,)
        features = layer.features if isinstance(layer.features, tuple) else (layer.features,)
        projection = proj.dense_general(call.x_ndim, axis, len(features))
    else:
        equation = call.einsum_str or layer.einsum_str
        projection = proj.einsum(equation, call.x_ndim, len(call.kernel_shape))
    projection.check(where)
    return projection


def _set_entry(params: Mapping[str, Any], path: tuple[str, ...], entry: Any) -> dict[str, Any]:
    head, *rest = path
    new = dict(params)
    new[head] = (
        _set_entry(params[head], tuple(rest), entry)
        if rest
        else {
            **params[head],
            ADAPTER_ENTRY: entry,
        }
    )
    return new


class _Interceptor:
    """Answers each adaptable layer's call with jpeft's op on the layer's kernel view."""

    def __init__(self, sites: Mapping[tuple[str, ...], Site], config: PeftConfig | None):
        self.sites = sites
        self.config = config

    def __call__(self, next_fun, args, kwargs, context):
        layer = context.module
        site = self.sites.get(layer.path) if context.method_name == "__call__" else None
        if site is None:
            return next_fun(*args, **kwargs)
        own = meta.unbox(layer.variables.get("params", {}))
        entry = own.get(ADAPTER_ENTRY)
        kernel = own[site.kernel_name]
        if entry is None and not isinstance(kernel, QuantizedTensor):
            return next_fun(*args, **kwargs)
        weight = flax_sites.make_node(site, site.call_weight(kernel), entry, self.config)
        if site.kind == proj.EMBEDDING:
            out = ops.embed(args[0], weight)
            return out.astype(layer.dtype or out.dtype)
        if site.kind == proj.CONV:

            def run(x, kernel, with_bias):
                params = {site.kernel_name: kernel}
                if with_bias and "bias" in own:
                    params["bias"] = own["bias"]
                conv = layer.clone(parent=None, use_bias=with_bias and "bias" in own)
                return conv.apply({"params": params}, x, *args[1:], **kwargs)

            view = site.view(kernel)
            return flax_sites.conv_output(site, view, weight, entry, self.config, args[0], run)
        x = args[0]
        stored = kernel.dtype if not isinstance(kernel, QuantizedTensor) else x.dtype
        dtype = layer.dtype or jnp.result_type(x, stored, *(own.get("bias", x),))
        einsum_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
        projection = _projection(layer, _Call(layer, x.ndim, site.kernel_shape, einsum_str), "")
        bias = own.get("bias")
        return projection.apply(
            x.astype(dtype),
            weight,
            None if bias is None else bias.astype(dtype),
            site.kernel_shape,
        )
