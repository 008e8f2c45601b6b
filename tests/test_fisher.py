"""FW-LoRA: the Fisher statistic against autograd, the probe's unbiasedness, the EMA, I_m, the penalty."""
from types import SimpleNamespace

import torch

from conftest import tiny_batch, tiny_model
from fisher import DeltaWPenalty, FisherProxy, FWLoRA, sq_grad_norm_exact, sq_grad_norm_probe
from lora import LoRALinear, freeze_base, inject


def lora_model(r=2, alpha=4.0, seed=0):
    model = tiny_model(seed=seed)
    layers = list(inject(model, lambda lin: LoRALinear(lin, r, alpha)).values())
    freeze_base(model)
    for l in layers:  # non-zero B so ΔW ≠ 0
        torch.nn.init.normal_(l.lora_B, std=0.1)
    return model, layers


def test_exact_statistic_equals_autograd_weight_gradient():
    model, layers = lora_model()
    proxy = FisherProxy(layers, estimator="exact")
    proxy.start()
    for l in layers:  # make W trainable only to read autograd's answer
        l.base.weight.requires_grad_(True)
    model(**tiny_batch()).loss.backward()
    want = torch.stack([l.base.weight.grad.pow(2).sum() for l in layers])
    assert torch.all(want > 0)
    torch.testing.assert_close(proxy.step_sq, want, rtol=1e-4, atol=1e-12)


def test_probe_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(3, 5, 12, generator=g), torch.randn(3, 5, 9, generator=g)
    exact = sq_grad_norm_exact(x, grad)
    n = 20000
    z = torch.randint(0, 2, (9, n), generator=g).float() * 2 - 1
    per_probe = (x.reshape(-1, 12).t() @ (grad.reshape(-1, 9) @ z)).pow(2).sum(0)  # one estimate per probe
    mean, sem = per_probe.mean(), per_probe.std() / n ** 0.5
    assert abs(mean - exact) < 4 * sem  # unbiased: within 4 standard errors
    assert abs(mean - exact) / exact < 0.02
    torch.testing.assert_close(sq_grad_norm_probe(x, grad, z), mean)


def test_ema_recursion_by_hand():
    _, layers = lora_model()
    proxy = FisherProxy(layers, decay=0.9)
    F = torch.zeros(len(layers))
    for t in range(3):
        val = torch.arange(len(layers), dtype=torch.float) + t
        proxy.step_sq.copy_(val)
        proxy.update()
        F = 0.9 * F + 0.1 * val
        torch.testing.assert_close(proxy.F, F)
        assert torch.all(proxy.step_sq == 0)


def test_importance_sums_to_one_and_is_fixed_after_warmup():
    model, layers = lora_model()
    fw = FWLoRA(layers, warmup_steps=2, estimator="exact")
    for _ in range(2):
        model(**tiny_batch()).loss.backward()
        fw.fisher.update()
    assert fw.in_warmup
    fw.end_warmup()
    assert not fw.in_warmup
    torch.testing.assert_close(fw.importance.sum(), torch.tensor(1.0))
    torch.testing.assert_close(fw.weights, 1 - fw.importance)
    F, I = fw.fisher.F.clone(), fw.importance.clone()
    (model(**tiny_batch(seed=1)).loss + fw.penalty()).backward()  # hooks are gone: nothing recorded
    assert torch.all(fw.fisher.step_sq == 0) and torch.equal(fw.fisher.F, F) and torch.equal(fw.importance, I)


def test_uniform_ablation_uses_mean_weight():
    model, layers = lora_model()
    fw = FWLoRA(layers, warmup_steps=1, uniform=True)
    model(**tiny_batch()).loss.backward()
    fw.fisher.update()
    fw.end_warmup()
    M = len(layers)
    assert torch.allclose(fw.weights, torch.full((M,), 1 - 1 / M))
    # same total scale: the uniform weight is the mean of the Fisher weights (Σ(1 - I_m) = M - 1)
    torch.testing.assert_close((1 - fw.importance).mean(), fw.weights[0])


def test_penalty_equals_explicit_delta_w_norm():
    _, layers = lora_model(r=3)
    w = torch.rand(len(layers))
    pen = DeltaWPenalty(layers, w)
    explicit = torch.stack([(l.scaling * l.lora_B @ l.lora_A).pow(2).sum() for l in layers])
    torch.testing.assert_close(pen.sq_norms(), explicit)
    torch.testing.assert_close(pen(), w @ explicit)
    factors = DeltaWPenalty(layers, w, form="factors")
    torch.testing.assert_close(factors.sq_norms(),
                               torch.stack([l.lora_A.pow(2).sum() + l.lora_B.pow(2).sum() for l in layers]))


def test_penalty_gradient_check():
    lin = torch.nn.Linear(6, 5).double()
    layers = [LoRALinear(lin, 3, 6.0).double(), LoRALinear(torch.nn.Linear(6, 5).double(), 3, 6.0).double()]
    for l in layers:
        torch.nn.init.normal_(l.lora_B)
    params = [p for l in layers for p in (l.lora_A, l.lora_B)]
    w = torch.tensor([0.3, 0.9], dtype=torch.double)

    def f(*ps):  # stand-in layers holding plain tensors, so gradcheck can differentiate
        fake = [SimpleNamespace(lora_A=a, lora_B=b, scaling=l.scaling) for l, a, b in zip(layers, ps[::2], ps[1::2])]
        return DeltaWPenalty(fake, w)()
    assert torch.autograd.gradcheck(f, [p.detach().clone().requires_grad_() for p in params])
