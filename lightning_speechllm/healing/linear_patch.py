"""Training-free healing: a closed-form linear patch folded into the weights (ReplaceMe, arXiv 2505.02819).

For a removed block of layers ``a .. b-1`` the unpruned model maps the stream ``x^a`` to ``x^b``. Layer ``a-1`` ends
with ``x^a = y + m``: ``y`` is the stream before its MLP is added, ``m`` the MLP's output. The patch is the matrix
``T`` that makes ``y + m T`` as close as possible to ``x^b`` over calibration tokens, by least squares with a ridge:

    T = (MᵀM + λI)⁻¹ Mᵀ (X_b − Y),      λ = ridge · trace(MᵀM) / d

``m T`` is what layer ``a-1``'s down projection writes when its weight ``W`` (``m = h Wᵀ + c``) becomes ``Tᵀ W`` and
its bias ``c T``. So the patched model is a stock decoder with no extra module, and it exports as one. A block that
starts at layer 0 has no layer before it and is refused; several blocks are fitted in order, each on the model with
the blocks before it already removed and patched (the states it will actually receive).

The statistics (``MᵀM``, ``Mᵀ(X_b − Y)``, ``‖X_b − Y‖²``) are summed in float64 over the non-padding tokens of the
calibration batches (speech, prompt and target tokens), and summed over ranks by ``reduce`` under DDP, so every rank
folds the same patch.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.model.layer_mask import find_decoder_layers, get_layer_mask_state
from lightning_speechllm.model.speechllm import SpeechLLM, eval_mode
from lightning_speechllm.model.sublayer_mask import is_dropped, mlp_module, pre_mlp_norm
from lightning_speechllm.redundancy.metrics import select_tokens

__all__ = ["FittedPatch", "LinearPatchConfig", "LinearPatchError", "PatchFit", "block_runs", "fit_linear_patch",
           "fold_linear_patch", "restore_weights"]

Reduce = Callable[[Tensor], Tensor]


class LinearPatchError(ValueError):
    """A plan or model the linear patch cannot be fitted or folded into."""


@dataclass
class LinearPatchConfig:
    """A closed-form linear patch in place of each removed block, folded into the layer before it (ReplaceMe)."""

    batches: int = 16
    """Calibration batches (the first ones of the training data) whose tokens the least squares fits on."""
    ridge: float = 1e-4
    """Ridge strength, relative to the mean eigenvalue of MᵀM (0: plain least squares)."""


@dataclass
class PatchFit:
    """How well one block's patch fits its calibration tokens."""

    start: int
    """First removed layer of the block (original numbering); the patch is folded into layer start - 1."""
    end: int
    """First kept layer after the block (the number of layers when the block ends the decoder)."""
    tokens: int
    """Calibration tokens fitted (all ranks)."""
    removal_error: float
    """‖x^start − x^end‖² / ‖x^end‖² over the tokens: the stream error of removing the block (T = I)."""
    patched_error: float
    """‖y + m T − x^end‖² / ‖x^end‖²: the error left with the patch."""
    seconds: float
    """Wall time of the block's calibration forwards and solve."""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FittedPatch:
    """The patches of a plan's blocks, how well each fits, and the weights they replaced."""

    patches: dict[int, Tensor]
    """{first removed layer of a block: T} (float32, CPU): what a checkpoint stores."""
    fits: list[PatchFit]
    originals: dict[int, tuple[Tensor, Tensor | None]]
    """The down projections' weights and biases before folding (for :func:`restore_weights`)."""


def block_runs(removed: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal contiguous runs ``[start, end)`` of ``removed`` layer indices, in order."""
    runs: list[list[int]] = []
    for index in sorted(set(removed)):
        if runs and index == runs[-1][1]:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    return [(start, end) for start, end in runs]


def down_projection(layer: nn.Module) -> nn.Linear:
    """The linear layer that writes a decoder layer's MLP output (PEFT's wrapper unwrapped)."""
    mlp = mlp_module(layer)
    for name in ("down_proj", "fc2", "w2", "c_proj", "dense_4h_to_h"):
        module = getattr(mlp, name, None)
        if module is not None:
            base = getattr(module, "base_layer", module)
            if isinstance(base, nn.Linear):
                return base
    raise LinearPatchError(f"the linear patch folds into the MLP's output projection, and {type(mlp).__name__} has "
                           "no nn.Linear down_proj / fc2 / w2")


def _check_foldable(speechllm: SpeechLLM, runs: list[tuple[int, int]]) -> None:
    if not runs:
        raise LinearPatchError("the plan removes no whole decoder layer: there is no block to patch")
    if runs[0][0] == 0:
        raise LinearPatchError(f"the removed block {runs[0][0]}-{runs[0][1] - 1} starts at layer 0: the patch is "
                               "folded into the layer before the block, and there is none")
    layers = get_layer_mask_state(speechllm.layer_mask.model).layer_list
    for start, _ in runs:
        layer = layers[start - 1]
        if is_dropped(mlp_module(layer)):
            raise LinearPatchError(f"layer {start - 1}'s MLP is dropped: the patch for the block from layer {start} "
                                   "is folded into it")
        weight = down_projection(layer).weight
        if type(weight.data) is not torch.Tensor:  # a sharded (FSDP DTensor) or meta weight cannot be rewritten
            raise LinearPatchError(f"layer {start - 1}'s down projection is a {type(weight.data).__name__}; fit the "
                                   "patch on an unsharded model")


class _BlockStatistics:
    """Float64 sums over tokens of MᵀM, Mᵀ(X_b − Y), ‖X_b − Y‖² and ‖X_b‖², and the token count."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.cross = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.scalars = torch.zeros(3, dtype=torch.float64, device=device)  # ‖R‖², ‖X_b‖², tokens

    def add(self, mlp_out: Tensor, before_mlp: Tensor, target: Tensor) -> None:
        m, residual = mlp_out.double(), target.double() - before_mlp.double()
        self.gram += m.T @ m
        self.cross += m.T @ residual
        self.scalars += torch.stack([residual.pow(2).sum(), target.double().pow(2).sum(),
                                     torch.tensor(float(len(m)), dtype=torch.float64, device=m.device)])

    def reduce(self, reduce: Reduce | None) -> None:
        if reduce is not None:
            self.gram, self.cross, self.scalars = reduce(self.gram), reduce(self.cross), reduce(self.scalars)

    def solve(self, ridge: float) -> Tensor:
        width = self.gram.shape[0]
        lam = ridge * torch.trace(self.gram) / width
        return torch.linalg.solve(self.gram + lam * torch.eye(width, dtype=torch.float64, device=self.gram.device),
                                  self.cross)

    def squared_error(self, patch: Tensor) -> float:
        """‖M T − R‖² from the sums: tr(TᵀGT) − 2 tr(TᵀC) + ‖R‖²."""
        return float((patch * (self.gram @ patch)).sum() - 2 * (patch * self.cross).sum() + self.scalars[0])


@torch.no_grad()
def _block_statistics(speechllm: SpeechLLM, batches: Sequence[SpeechBatch], start: int, end: int,
                      progress: bool) -> _BlockStatistics:
    """Sums over the batches' tokens for the block ``[start, end)`` on the model as its mask is now."""
    layers = get_layer_mask_state(speechllm.layer_mask.model).layer_list
    before = layers[start - 1]
    captured: dict[str, Tensor] = {}

    def keep(name: str, value: object) -> None:
        if not isinstance(value, Tensor):
            raise LinearPatchError(f"layer {start - 1}'s MLP returned a {type(value).__name__}, not a tensor: a "
                                   "mixture of experts has no single down projection to fold the patch into")
        captured[name] = value

    def stream_input(name: str):
        return lambda _m, args, kwargs: keep(name, args[0] if args else kwargs["hidden_states"])

    target_module = layers[end] if end < len(layers) else _final_norm(speechllm)
    hooks = [pre_mlp_norm(before).register_forward_pre_hook(lambda _m, args: keep("before_mlp", args[0])),
             mlp_module(before).register_forward_hook(lambda _m, _a, out: keep("mlp_out", out)),
             layers[start].register_forward_pre_hook(stream_input("block_input"), with_kwargs=True),
             target_module.register_forward_pre_hook(stream_input("target"), with_kwargs=True)]
    stats: _BlockStatistics | None = None
    try:
        for batch in tqdm(batches, desc=f"linear patch {start}-{end - 1}", unit="batch", disable=not progress,
                          leave=False):
            inputs = speechllm.build_inputs(batch.to(speechllm.device), with_targets=True)
            speechllm.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                          position_ids=inputs.position_ids, use_cache=False, logits_to_keep=1)
            tokens = select_tokens(inputs.segment_ids, "all")
            m, y, x, target = (captured[k][tokens] for k in ("mlp_out", "before_mlp", "block_input", "target"))
            if stats is None:
                _check_added_as_is(y + m, x, start - 1)
                stats = _BlockStatistics(m.shape[-1], m.device)
            stats.add(m, y, target)
    finally:
        for hook in hooks:
            hook.remove()
    if stats is None:
        raise LinearPatchError("the calibration batches are empty")
    return stats


def _check_added_as_is(summed: Tensor, stream: Tensor, layer: int) -> None:
    """The fold assumes the layer adds its MLP's output to the stream unchanged (no post-MLP norm or scale)."""
    scale = stream.float().abs().max().clamp_min(1e-6)
    if float((summed.float() - stream.float()).abs().max() / scale) > 1e-3:
        raise LinearPatchError(f"layer {layer} does not add its MLP's output to the residual stream as is (a "
                               "post-MLP norm or scale?): the linear patch cannot be folded into its down projection")


def _final_norm(speechllm: SpeechLLM) -> nn.Module:
    parent, _ = find_decoder_layers(speechllm.layer_mask.model)
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(parent, name, None), nn.Module):
            return getattr(parent, name)
    raise LinearPatchError(f"the block ends the decoder and {type(parent).__name__} has no final norm "
                           "(norm / final_layernorm / ln_f) to take its output from")


def fit_linear_patch(speechllm: SpeechLLM, removed_layers: Sequence[int], batches: Sequence[SpeechBatch],
                     config: LinearPatchConfig | None = None, reduce: Reduce | None = None,
                     progress: bool = True) -> FittedPatch:
    """Fit and fold the patch of each block of ``removed_layers``, in order, and leave those layers masked.

    ``speechllm`` must not mask any of them yet. :func:`fold_linear_patch` folds the returned patches again into a
    fresh copy of the model (a checkpoint's reload).
    """
    config = config or LinearPatchConfig()
    if config.batches < 1 or config.ridge < 0:
        raise LinearPatchError(f"linear patch batches must be >= 1 and ridge >= 0, got {config.batches}, "
                               f"{config.ridge}")
    runs = block_runs(removed_layers)
    _check_foldable(speechllm, runs)
    mask = speechllm.layer_mask
    already = sorted(set(mask.removed_layers) & set(removed_layers))
    if already:
        raise LinearPatchError(f"layers {already} are already masked: the patch is fitted on the states the "
                               "unpruned model gives there")
    entry = list(mask.active_layers)
    kept_before = list(entry)
    fitted = FittedPatch(patches={}, fits=[], originals={})
    try:
        _fit_blocks(speechllm, runs, batches, config, reduce, progress, kept_before, fitted)
    except BaseException:  # a failed block (singular MᵀM, out of memory, ^C) leaves no half-patched model behind
        restore_weights(speechllm, fitted.originals)
        mask.set_active_layers(entry)
        raise
    return fitted


def _fit_blocks(speechllm: SpeechLLM, runs: list[tuple[int, int]], batches: Sequence[SpeechBatch],
                config: LinearPatchConfig, reduce: Reduce | None, progress: bool, kept_before: list[int],
                fitted: FittedPatch) -> None:
    mask = speechllm.layer_mask
    with eval_mode(speechllm):
        for start, end in runs:
            began = time.perf_counter()
            stats = _block_statistics(speechllm, batches, start, end, progress)
            stats.reduce(reduce)
            patch = stats.solve(config.ridge)
            target = float(stats.scalars[1]) or 1.0
            identity = torch.eye(patch.shape[0], dtype=patch.dtype, device=patch.device)
            fitted.fits.append(PatchFit(start=start, end=end, tokens=int(stats.scalars[2]),
                                 removal_error=stats.squared_error(identity) / target,
                                 patched_error=stats.squared_error(patch) / target,
                                 seconds=time.perf_counter() - began))
            fitted.patches[start] = patch.float().cpu()
            fitted.originals.update(fold_linear_patch(speechllm, {start: fitted.patches[start]}))
            kept_before = [i for i in kept_before if not start <= i < end]
            mask.set_active_layers(kept_before)


@torch.no_grad()
def fold_linear_patch(speechllm: SpeechLLM, patches: dict[int, Tensor]) -> dict[int, tuple[Tensor, Tensor | None]]:
    """Fold each ``{start: T}`` into layer ``start - 1``'s down projection (W ← Tᵀ W, c ← c T); returns the original
    weights and biases for :func:`restore_weights`."""
    layers = get_layer_mask_state(speechllm.layer_mask.model).layer_list
    originals: dict[int, tuple[Tensor, Tensor | None]] = {}
    for start, patch in patches.items():
        if not 0 < int(start) < len(layers):
            raise LinearPatchError(f"linear patch for a block starting at layer {start}: no layer before it in a "
                                   f"decoder of {len(layers)} layers")
        down = down_projection(layers[int(start) - 1])
        width = down.weight.shape[0]
        if tuple(patch.shape) != (width, width):
            raise LinearPatchError(f"linear patch for layer {start} has shape {tuple(patch.shape)}, the model's "
                                   f"width is {width}")
        originals[int(start)] = (down.weight.detach().clone(),
                                 None if down.bias is None else down.bias.detach().clone())
        t = patch.to(device=down.weight.device, dtype=torch.float64)
        down.weight.copy_((t.T @ down.weight.double()).to(down.weight.dtype))
        if down.bias is not None:
            down.bias.copy_((down.bias.double() @ t).to(down.bias.dtype))
    return originals


@torch.no_grad()
def restore_weights(speechllm: SpeechLLM, originals: dict[int, tuple[Tensor, Tensor | None]]) -> None:
    """Put back the down projections :func:`fold_linear_patch` changed."""
    layers = get_layer_mask_state(speechllm.layer_mask.model).layer_list
    for start, (weight, bias) in originals.items():
        down = down_projection(layers[start - 1])
        down.weight.copy_(weight)
        if bias is not None:
            down.bias.copy_(bias)
