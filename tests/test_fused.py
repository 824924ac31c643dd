"""The fused multi-layer batch-entropy (`batch_entropies(..., fused=True)`, the default) against the per-layer reference
(`fused=False`): the same values and gradients whatever the shapes, dtypes, order and chunking; the memory it keeps for
the backward; and `torch.compile` without graph breaks."""

from __future__ import annotations

import pytest
import torch

import hf_batch_entropy.entropy.fused as entropy_module
from hf_batch_entropy.entropy.reference import PI_E
from conftest import TinyMLP, make_args, tiny_bert, token_dataset, vector_dataset
from hf_batch_entropy import BatchEntropyTrainer, batch_entropies

ATOL = 1e-5


def _layers(shapes, seed: int = 0, dtype=torch.float32, requires_grad: bool = True) -> list[torch.Tensor]:
    """Activations with very different scales and means per layer and unit (a dead unit in layer 0)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, shape in enumerate(shapes):
        scale = torch.rand(shape[1:], generator=g) * (i + 1) * 2
        mean = torch.randn(shape[1:], generator=g) * 3
        x = torch.randn(shape, generator=g) * scale + mean
        if i == 0:
            x.reshape(shape[0], -1)[:, 0] = 1.5  # a constant unit: σ² = 0
        layers.append(x.to(dtype).requires_grad_(requires_grad))
    return layers


def _clone(layers):
    return [x.detach().clone().requires_grad_(x.requires_grad) for x in layers]


def _check_against_reference(layers, **kwargs):
    """Forward and gradients of fused vs per-layer, under a random weighting of the layers' entropies."""
    fused_in, ref_in = _clone(layers), _clone(layers)
    fused = batch_entropies(fused_in, **kwargs)
    ref = batch_entropies(ref_in, fused=False)
    assert fused.dtype == torch.float32 and fused.shape == (len(layers),)
    torch.testing.assert_close(fused, ref, atol=ATOL, rtol=1e-5)
    weights = torch.randn(len(layers), generator=torch.Generator().manual_seed(1)).to(fused.device)
    (fused * weights).sum().backward()
    (ref * weights).sum().backward()
    for i, (a, b) in enumerate(zip(fused_in, ref_in)):
        if not b.requires_grad:
            assert a.grad is None
            continue
        assert a.grad.dtype == b.grad.dtype == b.dtype, f"layer {i}"
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=ATOL, rtol=1e-4, msg=f"gradient of layer {i}")
    return fused


@pytest.fixture(params=["per-layer backward", "stacked backward"])
def backward_mode(request, monkeypatch):
    """Both backward strategies of the fused path: per layer (CPUs) and one stacked chunk at a time (accelerators)."""
    if request.param == "stacked backward":
        monkeypatch.setattr(entropy_module, "_PER_LAYER_BACKWARD_DEVICES", ())
    return request.param


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_reference(dtype):
    """On a GPU the fused path stacks chunks (forward and backward): same values and gradients as the reference."""
    shapes = [(16, 32)] * 5 + [(16, 4, 3), (16, 32), (16, 4, 3)]
    layers = [x.detach().cuda().requires_grad_() for x in _layers(shapes, dtype=dtype)]
    fused = _check_against_reference(layers)
    assert fused.device.type == "cuda"


def test_same_shapes(backward_mode):
    _check_against_reference(_layers([(16, 32)] * 7))


def test_mixed_and_interleaved_shapes_keep_the_layer_order(backward_mode):
    shapes = [(8, 16), (8, 4, 3), (8, 16), (8, 5), (8, 4, 3), (8, 16), (8, 2, 2, 3), (8, 5)]
    layers = _layers(shapes)
    fused = _check_against_reference(layers)
    # Each output is its own layer's entropy, not a neighbour's.
    for i, x in enumerate(layers):
        torch.testing.assert_close(fused[i], batch_entropies([x.detach()], fused=False)[0], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("max_numel", [1, 8 * 16, 3 * 8 * 16, 1 << 30])
def test_chunking_does_not_change_the_result(monkeypatch, backward_mode, max_numel):
    # 1 → one layer per chunk; 8·16 → one (8, 16) layer per chunk; 3·8·16 → chunks of 3 and a remainder; huge → one.
    monkeypatch.setattr(entropy_module, "_MAX_CHUNK_NUMEL", max_numel)
    monkeypatch.setattr(entropy_module, "_CPU_CHUNK_NUMEL", max_numel)
    shapes = [(8, 16)] * 7 + [(8, 4, 3)] * 2 + [(8, 16)] * 2
    _check_against_reference(_layers(shapes))


def test_chunks_are_bounded(monkeypatch):
    monkeypatch.setattr(entropy_module, "_MAX_CHUNK_NUMEL", 3 * 8 * 16)
    monkeypatch.setattr(entropy_module, "_CPU_CHUNK_NUMEL", 1 << 30)
    units = [x.reshape(8, -1) for x in _layers([(8, 16)] * 7 + [(8, 12)] * 2, requires_grad=False)]
    assert entropy_module.chunk_layers(units) == [[[0, 1, 2], [3, 4, 5], [6]], [[7, 8]]]
    # On CPUs the smaller of the two limits applies.
    monkeypatch.setattr(entropy_module, "_CPU_CHUNK_NUMEL", 2 * 8 * 16)
    assert entropy_module.chunk_layers(units)[0] == [[0, 1], [2, 3], [4, 5], [6]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backward_mode, dtype):
    # Computed in float32 from the low-precision values; gradients come back in the layers' dtype.
    _check_against_reference(_layers([(16, 8)] * 4 + [(16, 2, 3)], dtype=dtype))


def test_mixed_dtypes_same_shape(backward_mode):
    layers = _layers([(16, 8)] * 4)
    layers[1] = layers[1].detach().to(torch.bfloat16).requires_grad_()
    layers[3] = layers[3].detach().double().requires_grad_()
    _check_against_reference(layers)


def test_single_layer_duplicates_and_layers_without_gradient(backward_mode):
    _check_against_reference(_layers([(4, 3)]))
    x = _layers([(8, 6)])[0]
    _check_against_reference([x, x, x])  # the same tensor three times: three contributions to its gradient
    layers = _layers([(8, 6)] * 4)
    layers[2] = layers[2].detach()
    _check_against_reference(layers)


def test_non_contiguous_layers(backward_mode):
    layers = [x.detach().transpose(1, 2).requires_grad_() for x in _layers([(8, 3, 4)] * 3)]
    assert not layers[0].is_contiguous()
    _check_against_reference(layers)


def test_inputs_are_not_modified(backward_mode):
    for shapes in ([(8, 16)], [(8, 16)] * 3):
        layers = _layers(shapes)
        before = [x.detach().clone() for x in layers]
        batch_entropies(layers).sum().backward()
        for x, b in zip(layers, before):
            assert torch.equal(x.detach(), b)


def test_values_and_gradients_are_the_two_pass_formula_bit_for_bit(backward_mode):
    """The arithmetic, operation by operation: `μ = mean_b x`, `Σ_b (x − μ)²`, `½·ln(π·e·σ² + 1)` averaged over units,
    and the gradient `(x − μ)·2g`. Trained networks are chaotic: a change of one rounding moves every result trained
    with the estimator, so a faster implementation must round as this does."""
    layers = _layers([(32, 64)] * 5 + [(32, 7)])
    weights = torch.randn(len(layers), generator=torch.Generator().manual_seed(1))
    got = batch_entropies(layers)
    (got * weights).sum().backward()
    for i, x in enumerate(layers):
        leaf = x.detach().clone().requires_grad_()
        stacked = leaf.unsqueeze(0)
        mean = stacked.detach().mean(dim=1, keepdim=True)
        squares = (stacked - mean).square().sum(dim=1)
        entropy = (0.5 * torch.log1p(PI_E * (squares / (x.shape[0] - 1)))).mean(dim=1)
        assert torch.equal(got[i : i + 1].detach(), entropy.detach()), f"layer {i}"
        g = torch.autograd.grad((entropy * weights[i]).sum(), squares)[0]
        assert torch.equal(x.grad, ((x.detach() - mean[0]) * (2.0 * g))), f"gradient of layer {i}"


def test_no_grad_and_requires_grad_give_the_same_values():
    layers = _layers([(8, 16)] * 3 + [(8, 5)])
    with torch.no_grad():
        a = batch_entropies(layers)
    torch.testing.assert_close(a, batch_entropies(layers).detach(), atol=0, rtol=0)
    torch.testing.assert_close(a, batch_entropies(layers, fused=False).detach(), atol=ATOL, rtol=1e-5)


def test_a_large_mean_does_not_cancel_the_variance():
    # Units with mean 100 and standard deviation 0.01: E[x²] − E[x]² in float32 would lose every digit of the variance
    # (E[x²] = 1e4 has a float32 spacing of 1e-3, 10× the variance); the two-pass variance keeps it.
    g = torch.Generator().manual_seed(0)
    x = (100 + 0.01 * torch.randn(64, 8, generator=g, dtype=torch.float64)).float()
    var = x.double().var(dim=0)
    expected = (0.5 * torch.log1p(torch.pi * torch.e * var)).mean().item()
    naive_var = (x * x).mean(0) - x.mean(0) ** 2
    assert not torch.allclose(naive_var * 64 / 63, var.float(), rtol=0.1)  # the test can tell
    for got in batch_entropies([x, x * 1.0]):
        assert got.item() == pytest.approx(expected, rel=1e-4)


def test_backward_keeps_no_stacked_copy():
    """What the fused path saves for the backward: the layers themselves (no copy) and the (L, 1, U) means."""
    layers = _layers([(32, 64)] * 10)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        entropies = batch_entropies(layers)
    layer_storages = {x.untyped_storage().data_ptr() for x in layers}
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in layer_storages]
    extra_bytes = sum(t.numel() * t.element_size() for t in extra)
    layer_bytes = sum(x.numel() * x.element_size() for x in layers)
    assert extra_bytes <= layer_bytes / 16, f"the backward keeps {extra_bytes} bytes beside the layers"
    entropies.sum().backward()
    assert all(x.grad is not None for x in layers)


def test_per_layer_gradients_are_separate_tensors():
    """On CPUs each layer's gradient is its own allocation, so autograd can free it as soon as it is consumed."""
    layers = _layers([(16, 8)] * 5)
    hidden = [x * 1.0 for x in layers]
    seen = []
    for h in hidden:
        h.register_hook(lambda g: seen.append(g.untyped_storage().data_ptr()))
    batch_entropies(hidden).sum().backward()
    assert len(set(seen)) == len(hidden)


# --- torch.compile ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [True, False])
def test_no_graph_break(requires_grad):
    import torch._dynamo as dynamo

    shapes = [(8, 16)] * 3 + [(8, 4, 3), (8, 16), (8, 5)]  # interleaved: exercises the reordering too
    dynamo.reset()
    explanation = dynamo.explain(batch_entropies)(_layers(shapes, requires_grad=requires_grad))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_matches_eager():
    """`torch.compile(fullgraph=True)` of the fused path (aot_eager: dynamo and AOT autograd, no C++ compiler)."""
    import torch._dynamo as dynamo

    dynamo.reset()
    compiled = torch.compile(batch_entropies, backend="aot_eager", fullgraph=True)
    shapes = [(8, 16)] * 3 + [(8, 4, 3), (8, 16)]
    layers = _layers(shapes)
    a, b = _clone(layers), _clone(layers)
    got = compiled(a)
    want = batch_entropies(b, fused=False)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    weights = torch.randn(len(shapes))
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, atol=ATOL, rtol=1e-4)


def _train_params(tmp_path, model_name: str, device: str = "cpu", **kwargs) -> tuple[dict, BatchEntropyTrainer]:
    torch.manual_seed(0)
    model, dataset = (TinyMLP(depth=4, width=32), vector_dataset()) if model_name == "mlp" else (tiny_bert(), token_dataset())
    args = make_args(tmp_path, use_cpu=device == "cpu", max_steps=2, learning_rate=1e-2, lbe_alpha=0.8, lbe_alpha_min=0.1, **kwargs)
    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}, trainer


def _check_compiled_training(tmp_path, model_name, device, backend, atol):
    import torch._dynamo as dynamo

    eager, eager_trainer = _train_params(tmp_path / "eager", model_name, device)
    dynamo.reset()
    compiled, trainer = _train_params(
        tmp_path / "compiled", model_name, device, torch_compile=True, torch_compile_backend=backend
    )
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule), type(trainer.model_wrapped)
    assert trainer.regularizer.num_layers == eager_trainer.regularizer.num_layers
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=atol, rtol=0, msg=k)
    torch.testing.assert_close(trainer.regularizer.alpha, eager_trainer.regularizer.alpha, atol=atol, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mlp", "bert"], ids=["forward-hooks", "hidden-states"])
def test_trainer_torch_compile_cpu(tmp_path, model_name):
    """`torch_compile=True` with the regularizer, on both capture paths, trains exactly like eager. The aot_eager
    backend exercises dynamo (hooks and hidden states in the compiled graph) and AOT autograd without a C++ compile;
    scripts/gpu_check.sh runs inductor on a GPU."""
    _check_compiled_training(tmp_path, model_name, "cpu", "aot_eager", atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_name", ["mlp", "bert"], ids=["forward-hooks", "hidden-states"])
def test_trainer_torch_compile_cuda_inductor(tmp_path, model_name):
    _check_compiled_training(tmp_path, model_name, "cuda", "inductor", atol=1e-4)


def test_backward_of_a_chunk_runs_when_the_model_backward_reaches_it(monkeypatch):
    """Each chunk's gradients are computed just before the model's backward needs them (deepest layer first), not
    all at the start of the backward: at most one chunk of layer gradients waits in memory."""
    monkeypatch.setattr(entropy_module, "_CPU_CHUNK_NUMEL", 3 * 8 * 16)  # chunks of 3 layers
    torch.manual_seed(0)
    weights = [(torch.randn(16, 16) * 0.3).requires_grad_() for _ in range(9)]
    h = torch.randn(8, 16)
    hidden = []
    for w in weights:
        h = torch.tanh(h @ w)
        hidden.append(h)
    events = []
    for i, layer in enumerate(hidden):
        layer.register_hook(lambda g, i=i: events.append(("layer", i)))
    real_backward = entropy_module._SquaredDeviations.backward

    def backward(ctx, grad):
        events.append(("chunk", len(ctx.saved_tensors) - 1))
        return real_backward(ctx, grad)

    monkeypatch.setattr(entropy_module._SquaredDeviations, "backward", staticmethod(backward))
    loss = hidden[-1].sum() + batch_entropies(hidden).sum()
    loss.backward()
    # Layers 8, 7, 6 form the last chunk, 5, 4, 3 the middle one, 2, 1, 0 the first.
    order = [e for e in events if e[0] == "layer"]
    assert order == [("layer", i) for i in range(8, -1, -1)]
    chunks = [position for position, e in enumerate(events) if e[0] == "chunk"]
    assert len(chunks) == 3
    assert chunks[1] > events.index(("layer", 6)) and chunks[2] > events.index(("layer", 3))
    assert all(w.grad is not None for w in weights)


def test_gradient_of_a_2d_layer_is_added_in_place_to_the_model_gradient():
    """The estimator's gradient of a 2-D layer `(B, U)` reaches the layer as a fresh tensor, not through a view node, so
    autograd adds the model's own gradient of that layer to it in place: no out-of-place `aten::add` (a new tensor and
    a copy) per layer. (Seen through `reshape(B, -1)`, 447 of 500 layers of the depth-500 MLP were added out of place.)"""
    from torch.profiler import profile

    torch.manual_seed(0)
    weights = [(torch.randn(16, 16) * 0.3).requires_grad_() for _ in range(12)]
    h = torch.randn(8, 16)
    hidden = []
    for w in weights:
        h = torch.relu(h @ w)
        hidden.append(h)
    loss = hidden[-1].sum() + batch_entropies(hidden).sum()
    with profile() as prof:
        loss.backward()
    counts = {event.key: event.count for event in prof.key_averages()}
    # Two are not per layer: the last layer's gradient from `.sum()` (an expanded view) and the loss's own sum. The
    # previous estimator made 13 here (one per layer that got its gradient from the estimator first).
    assert counts.get("aten::add", 0) <= 2, counts.get("aten::add")
    assert counts.get("aten::add_", 0) >= len(hidden) - 1  # the additions happen, in place
    assert all(w.grad is not None for w in weights)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_twice_differentiable_as_the_reference(masked):
    """`backward(create_graph=True)` through the fused path (a gradient penalty) gives the reference loop's
    second-order gradients: the gradient it returns has a graph of its own, not a constant."""
    torch.manual_seed(0)
    weight = torch.randn(6, 6, requires_grad=True)
    inputs = torch.randn(5, 3, 6)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]]) if masked else None

    def penalty(fused: bool) -> torch.Tensor:
        hidden = torch.tanh(inputs @ weight)
        layers = [hidden, torch.tanh(hidden @ weight)]
        entropies = batch_entropies(layers, fused=fused, masks=[mask, mask] if masked else None)
        (grad,) = torch.autograd.grad(entropies.sum(), weight, create_graph=True)
        return grad.square().sum()

    (expected,) = torch.autograd.grad(penalty(fused=False), weight)
    (got,) = torch.autograd.grad(penalty(fused=True), weight)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert got.abs().sum() > 0
