"""Eager PyTorch reference of the ResUNet, TENT and the GraTa step (optional: needs torch).

Used by the equivalence tests and by the benchmark.  The network follows the
official GraTa/VPTTA layout and parameter names (``res.*``, ``up1..up5``,
``bnout``, ``seg_head``) so that :func:`tta_jax.source.convert.torch_state_dict_to_flax`
maps its ``state_dict`` onto the Flax model; ``width`` scales channels as in
:class:`tta_jax.models.ResUNet`.

The GraTa step mirrors the official optimiser's flow on BN parameters:
backward L_ent, keep g_aux, θ ← θ − g_aux, backward L_con (teacher from 6 weak
views under no_grad, student from the strong view), cosine, restore θ, set
Adam's lr to β·¼(cos+1)², Adam step on g_pse, predict.  All forwards in
train mode (test-image BN statistics); running statistics are restored after
each step so they never drift (the JAX side never updates them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STAGES = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
          "resnet50": ("bottleneck", (3, 4, 6, 3))}


def _c(base, width):
    return max(1, int(round(base * width)))


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Encoder(nn.Module):
    def __init__(self, backbone, width, official_fc=False):
        super().__init__()
        kind, blocks = STAGES[backbone]
        block = Basic if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, _c(64, width), 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(_c(64, width))
        cin = _c(64, width)
        self.channels = [cin]
        for i, n in enumerate(blocks):
            layers = []
            for j in range(n):
                planes = _c(64 * 2**i, width)
                layers.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            self.channels.append(cin)
        if official_fc:   # the official ResNet always builds its ImageNet classifier; nothing uses it
            self.fc = nn.Linear(cin, 1000)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        skips = [x]
        x = F.max_pool2d(x, 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            skips.append(x)
        return x, skips


class UnetBlock(nn.Module):
    def __init__(self, up_in, x_in, n_out):
        super().__init__()
        self.tr_conv = nn.ConvTranspose2d(up_in, n_out // 2, 2, stride=2)
        self.x_conv = nn.Conv2d(x_in, n_out // 2, 1)
        self.bn = nn.BatchNorm2d(n_out)

    def forward(self, up, skip):
        return self.bn(F.relu(torch.cat([self.tr_conv(up), self.x_conv(skip)], 1)))


class TorchResUNet(nn.Module):
    """The official ResUNet; ``official_fc`` also builds the unused ``res.fc`` of the official code,
    so that its ``state_dict`` has the official key set."""

    def __init__(self, backbone="resnet34", num_classes=2, width=1.0, official_fc=False):
        super().__init__()
        self.res = Encoder(backbone, width, official_fc)
        ch = self.res.channels
        d = _c(256, width)
        self.up1 = UnetBlock(ch[4], ch[3], d)
        self.up2 = UnetBlock(d, ch[2], d)
        self.up3 = UnetBlock(d, ch[1], d)
        self.up4 = UnetBlock(d, ch[0], d)
        self.up5 = nn.ConvTranspose2d(d, _c(32, width), 2, stride=2)
        self.bnout = nn.BatchNorm2d(_c(32, width))
        self.seg_head = nn.Conv2d(_c(32, width), num_classes, 1)

    def forward(self, x):
        x, s = self.res(x)
        x = F.relu(x)
        x = self.up1(x, s[3])
        x = self.up2(x, s[2])
        x = self.up3(x, s[1])
        x = self.up4(x, s[0])
        return self.seg_head(F.relu(self.bnout(self.up5(x))))


def bn_parameters(model):
    return [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]


def freeze_all_but_bn(model):
    """``requires_grad`` off for every parameter but the BatchNorm affine ones (TENT's ``configure_model``):
    backward then skips the weight gradients the BN-only methods never use. The official GraTa flow,
    which :func:`grata_step` follows, leaves them on."""
    keep = {id(p) for p in bn_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model


class _FrozenRunningStats:
    """Forward in train mode (batch statistics) without moving the running statistics."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = {k: v.clone() for k, v in self.model.state_dict().items() if "running" in k}
        self.model.train()

    def __exit__(self, *exc):
        self.model.load_state_dict(self.saved, strict=False)


def entropy_plogp(logits):
    p = torch.sigmoid(logits)
    return (-(p * torch.log(p + 1e-6)).sum(1)).mean()


def binary_entropy(logits):
    p = torch.sigmoid(logits)
    return (-(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))).sum(1).mean()


# Weak views in NCHW (H = -2, W = -1) and their inverses.
WEAK = [
    (lambda x: x, lambda y: y),
    (lambda x: x.flip(-1), lambda y: y.flip(-1)),
    (lambda x: x.flip(-2), lambda y: y.flip(-2)),
    (lambda x: x.flip(-1).transpose(-2, -1), lambda y: y.transpose(-2, -1).flip(-1)),
    (lambda x: x.flip(-1).flip(-2), lambda y: y.flip(-1).flip(-2)),
    (lambda x: x.transpose(-2, -1).flip(-1), lambda y: y.flip(-1).transpose(-2, -1)),
]


def strong_view(x, generator=None, off=False):
    """Strong view of an NCHW batch in [0, 1] (same op order and ranges as tta_jax.augment)."""
    if off:
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-8)
    g = generator
    u = lambda *s: torch.rand(*s, generator=g)
    out = []
    for img in x:
        c = img.shape[0]
        if u(1) < 0.75:
            img = img * (0.5 + u(c, 1, 1))
        if u(1) < 0.75:
            f = torch.where(u(c, 1, 1) < 0.5, 0.5 + 0.5 * u(c, 1, 1), 1 + 0.5 * u(c, 1, 1))
            mean = img.mean((1, 2), keepdim=True)
            lo, hi = img.amin((1, 2), keepdim=True), img.amax((1, 2), keepdim=True)
            img = torch.maximum(torch.minimum((img - mean) * f + mean, hi), lo)
        if u(1) < 0.75:
            gam = torch.where(u(c, 1, 1) < 0.5, 0.5 + 0.5 * u(c, 1, 1), 1 + u(c, 1, 1))
            inv = -img
            lo, hi = inv.amin((1, 2), keepdim=True), inv.amax((1, 2), keepdim=True)
            img = -((((inv - lo) / (hi - lo + 1e-7)) ** gam) * (hi - lo) + lo)
        if u(1) < 0.5:
            img = img + 0.05 * u(1) * torch.randn(img.shape, generator=g)
        if u(1) < 0.5:
            radius = 6
            t = torch.arange(-radius, radius + 1, dtype=img.dtype)
            chans = []
            for ch in img:
                if u(1) < 0.5:
                    sigma = 0.5 + u(1)
                    k = torch.exp(-0.5 * (t / sigma) ** 2)
                    k = k / k.sum()
                    p = F.pad(ch[None, None], (radius,) * 4, mode="reflect")
                    p = F.conv2d(p, k.view(1, 1, 1, -1))
                    ch = F.conv2d(p, k.view(1, 1, -1, 1))[0, 0]
                chans.append(ch)
            img = torch.stack(chans)
        out.append(img)
    x = torch.stack(out)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def make_adam(model, lr):
    return torch.optim.Adam(bn_parameters(model), lr=lr, betas=(0.9, 0.999))


def tent_step(model, optimizer, x):
    """One TENT step (Bernoulli entropy, BN affine, Adam) then predict; returns (logits, loss)."""
    with _FrozenRunningStats(model):
        optimizer.zero_grad()
        loss = binary_entropy(model(x))
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            logits = model(x)
    return logits, float(loss.detach())


def grata_step(model, optimizer, x, beta=1e-4, strong_off=False, generator=None):
    """One GraTa step (official flow) then predict; returns (logits, info)."""
    params = bn_parameters(model)
    with _FrozenRunningStats(model):
        optimizer.zero_grad()
        aux_loss = entropy_plogp(model(x))
        aux_loss.backward()
        g_aux = [p.grad.detach().clone() for p in params]
        old = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, g_aux):
                p.sub_(g)                                       # θ' = θ − g_aux
            teacher = torch.stack([inv(torch.sigmoid(model(view(x)))) for view, inv in WEAK]).mean(0)
        optimizer.zero_grad()
        student = model(strong_view(x, generator, off=strong_off))
        pse_loss = F.binary_cross_entropy_with_logits(student, teacher)
        pse_loss.backward()
        g_pse = [p.grad for p in params]
        inner = sum((a * b).sum() for a, b in zip(g_pse, g_aux))
        norm = lambda gs: torch.sqrt(sum((g ** 2).sum() for g in gs))
        cos = inner / (norm(g_pse) * norm(g_aux) + 1e-12)
        with torch.no_grad():
            for p, o in zip(params, old):
                p.copy_(o)                                      # back to θ
        eta = beta * 0.25 * (float(cos) + 1) ** 2
        optimizer.param_groups[0]["lr"] = eta
        optimizer.step()
        with torch.no_grad():
            logits = model(x)
    return logits, {"cos": float(cos.detach()), "eta": eta, "aux_loss": float(aux_loss.detach()),
                    "pse_loss": float(pse_loss.detach())}


def make_step(name: str, model, hp):
    """An eager step ``step(x) -> (logits, info)`` of method ``name`` with ``hp``, or None if not referenced.

    The reference implements ``tent`` and ``grata`` (their default objectives);
    the benchmark times it against the JAX step.
    """
    if name == "tent":
        opt = torch.optim.Adam(bn_parameters(model), lr=hp.lr, betas=(hp.b1, hp.b2))
        return lambda x: tent_step(model, opt, x)
    if name == "grata":
        opt = torch.optim.Adam(bn_parameters(model), lr=hp.lr, betas=(hp.b1, hp.b2))
        return lambda x: grata_step(model, opt, x, beta=hp.lr)
    return None
