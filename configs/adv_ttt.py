"""Adversarial test-time training (Valvano et al.): a GAN mask discriminator re-used as a shape prior,
and a per-image input adaptor tuned against it, next to the frozen model.

Run (synthetic default: trains — or reuses the cached — adversarial source model on A, then adapts
every image of B–F; CPU, minutes)::

  python -m experiments.main --config=configs/adv_ttt.py --workdir=/tmp/tta_adv
  python -m experiments.main --config=configs/adv_ttt.py:dae --workdir=/tmp/tta_dae
  python -m experiments.main --config=configs/adv_ttt.py:table1 --workdir=/tmp/tta_adv_ablation

Variants: ``table1`` — the ablation of Valvano et al. Table 1, one source stage per row (each
trained or reused from the cache, then merged into ``merged.md``): ``1_unet`` (supervised only),
``2_gan`` (adversarial, plain discriminator, no fake anchors), ``3_gan_smooth`` (+ spectral norm
and tanh, #1), ``4_gan_smooth_anchors`` (+ fake anchors, #2), whose ``adv_ttt`` row adds test-time
training (#3); the paper's table is semi-supervised, every row here uses all source labels (the
UNet row has no use for unpaired data); ``dae`` — the adversarial prior against the shape prior of a mask denoising
autoencoder (Karani et al.; Valvano et al. Fig. 4): rows no_adapt, adv_ttt, dae_ttt on the same
segmentor, the DAE trained on the source masks (``--config.dae.*``); ``polyp`` — real data,
Kvasir-SEG → CVC-ClinicDB (100 evenly spaced target images); ``paper`` — 512², ResNet-34, Adam
1e-4 for the segmentor, the official-code tuning schedule (up to 2000 iterations, patience 200,
keep the best-loss prediction); ``semi`` — semi-supervised source stage (25 % labelled, the rest
as unpaired images and masks); ``quick`` — a smoke run. Every option is an override, e.g.
``--config.adv_ttt.n_iter=100``, ``--config.adversarial.adv_weight=0.05``.
"""
from configs import common


def get_config(arg=None):
    c = common.get_base_config()
    c.methods = "no_adapt,adv_ttt"
    c.metrics = "dice"
    # 50 tuning iterations per image make adv_ttt ~50× the cost of tent: the default adapts the
    # first 20 test images of each target domain (a prefix of the other configs' 40), so the
    # command stays under 15 minutes on 2 cores; --config.synthetic.num_test=40 for the full set.
    c.synthetic.num_test = 20
    parts = [a for a in (arg or "").split(",") if a]
    if "table1" in parts:
        parts.remove("table1")
        c.source_stages = {
            "1_unet": {"methods": "no_adapt", "overrides": {"source": {"adversarial": False}}},
            "2_gan": {"methods": "no_adapt", "overrides": {
                "source": {"adversarial": True}, "adversarial": {"smoothness": False, "fake_anchors": False}}},
            "3_gan_smooth": {"methods": "no_adapt", "overrides": {
                "source": {"adversarial": True}, "adversarial": {"fake_anchors": False}}},
            "4_gan_smooth_anchors": {"methods": "no_adapt,adv_ttt", "overrides": {}},
        }
    if "dae" in parts:
        parts.remove("dae")
        c.methods = "no_adapt,adv_ttt,dae_ttt"
        c.compare_to = "adv_ttt"       # Valvano et al.'s Wilcoxon test of the two priors
    if "semi" in parts:
        parts.remove("semi")
        c.adversarial.labelled_fraction = 0.25
    c = common.apply_variant(c, ",".join(parts))
    if "polyp" in parts:
        # adv_ttt tunes Ω for n_iter steps per image: 100 evenly spaced CVC-ClinicDB images keep the
        # CPU run practical (README, adversarial TTT); --config.max_target_images=0 adapts all 609.
        c.max_target_images = 100
    if "paper" in parts:
        c.source.lr = 1e-4
        c.source.optimizer = "adam"
        c.adversarial.disc_width = 1.0
        for name in ("adv_ttt", "dae_ttt"):
            c[name].n_iter, c[name].patience, c[name].keep_best = 2000, 200, True
        c.dae.steps = 30000
    return c
