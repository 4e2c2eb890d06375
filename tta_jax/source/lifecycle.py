"""The source model's lifecycle: build, restore (orbax or official ``.pth``), cache, train.

:func:`get_source_model` returns the variables every method starts from. It
restores ``source_checkpoint`` when given; otherwise it reuses the cached
model trained with the same settings (:func:`source_settings` is the cache
key), or trains one and caches it. What the methods of a run need from the
source stage (:class:`tta_jax.methods.SourceNeeds`: auxiliary heads,
companion networks such as adv_ttt's mask discriminator, dae_ttt's mask
denoising autoencoder or ttdg's universe) is part of those
settings: it decides what is built and trained.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging

from tta_jax import checkpoints
from tta_jax.data.digest import content_hash, describe_change, file_digest, manifest, manifest_digest
from tta_jax.hparams import HParamError, as_dict, from_mapping
from tta_jax.methods import SourceNeeds
from tta_jax.models import ResUNet, init_variables
from tta_jax.models.resunet import AUX_HEADS
from tta_jax.source.adversarial import AdversarialHParams, train_adversarial_source
from tta_jax.source.dae import DAEHParams, train_dae
from tta_jax.source.training import train_source
from tta_jax.source.universe import UniverseHParams, train_universe

SOURCE_CACHE_VERSION = 1  # bump when source training changes meaning
# companions the source stage knows how to train, and the config switch that asks for them
COMPANIONS = ("discriminator", "dae", "universe")


def split_list(value: str) -> list[str]:
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def merge_needs(needs: list[SourceNeeds]) -> SourceNeeds:
    """One :class:`SourceNeeds` covering all of ``needs`` (in a fixed order)."""
    heads = {h for n in needs for h in n.aux_heads}
    companions = {c for n in needs for c in n.companions}
    unknown = sorted(companions - set(COMPANIONS))
    if unknown:
        raise HParamError(f"no source stage provides {', '.join(unknown)}; it provides {', '.join(COMPANIONS)}")
    return SourceNeeds(tuple(h for h in AUX_HEADS if h in heads), tuple(c for c in COMPANIONS if c in companions))


def resolved_source(config, needs: SourceNeeds) -> tuple[tuple[str, ...], bool]:
    """(auxiliary heads, adversarial stage?) from the config and what the methods need."""
    heads = set(split_list(config.model.aux_heads)) | set(needs.aux_heads)
    adversarial = bool(config.source.adversarial) or "discriminator" in needs.companions
    return tuple(h for h in AUX_HEADS if h in heads), adversarial


def build_model(config, num_classes: int, needs: SourceNeeds = SourceNeeds()) -> ResUNet:
    heads, _ = resolved_source(config, needs)
    return ResUNet(backbone=config.model.backbone, num_classes=num_classes, width=config.model.width,
                   aux_heads=heads, sr_factor=config.model.sr_factor,
                   compute_dtype=config.model.get("compute_dtype", "float32"))


def adversarial_hparams(config) -> AdversarialHParams:
    return from_mapping(AdversarialHParams, config.adversarial, "adversarial")


def dae_hparams(config) -> DAEHParams:
    return from_mapping(DAEHParams, config.dae, "dae")


def universe_hparams(config) -> UniverseHParams:
    return from_mapping(UniverseHParams, config.universe, "universe")


def universe_network(config, model=None):
    """The universe network, as wide as the segmentor's last feature map (its ``return_features`` output)."""
    model = model if model is not None else build_model(config, 2)
    (_, features), _ = jax.eval_shape(
        lambda k: model.init_with_output(k, jnp.zeros((1, 32, 32, 3)), return_features=True), jax.random.PRNGKey(0))
    return universe_hparams(config).network(features.shape[-1])


def companions(config, needs: SourceNeeds) -> dict:
    """The companion networks (Flax modules) the methods need, by name."""
    out = {}
    if "discriminator" in needs.companions:
        out["discriminator"] = adversarial_hparams(config).discriminator()
    if "dae" in needs.companions:
        out["dae"] = dae_hparams(config).network()
    if "universe" in needs.companions:
        out["universe"] = universe_network(config)
    return out


def source_settings(config, needs: SourceNeeds = SourceNeeds(), data_digest: str = "") -> dict:
    """Everything that determines a trained source model (the cache key).

    ``data_digest``: the content digest of the training images and masks as
    read (:mod:`tta_jax.data.digest`), so the key follows the data, not its path.
    """
    heads, adversarial = resolved_source(config, needs)
    source = {**config.source.to_dict(), "adversarial": adversarial}
    # source models always train in float32 (get_source_model); compute_dtype is a test-time choice
    model = {k: v for k, v in config.model.to_dict().items() if k != "compute_dtype"}
    settings = dict(version=SOURCE_CACHE_VERSION, dataset=config.dataset, data=data_digest,
                    source_domain=config.source_domain, image_size=config.image_size,
                    model={**model, "aux_heads": ",".join(heads)}, source=source)
    if adversarial:
        settings["adversarial"] = as_dict(adversarial_hparams(config))
    if "dae" in needs.companions:
        settings["dae"] = as_dict(dae_hparams(config))
    if "universe" in needs.companions:
        settings["universe"] = as_dict(universe_hparams(config))
    return settings


def _explain_retraining(cache: Path, settings: dict, train_manifest: dict, source: str) -> str:
    """Why no cached model fits: a cached model with the same settings but other training data, if any."""
    if cache.is_dir():
        for meta_path in sorted(cache.glob("*/meta.json")):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            old = meta.get("settings", {})
            if {**old, "data": ""} == {**settings, "data": ""} and "manifest" in meta:
                return f"source data changed: {describe_change(meta['manifest'], train_manifest, source)}; retraining"
    return "no cached source model with these settings; training one"


def segmentor_variables(variables) -> dict:
    """The segmentor's collections only (drops companions such as the discriminator)."""
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def get_source_model(config, model, dataset, source: str, needs: SourceNeeds = SourceNeeds()):
    """Restore ``source_checkpoint`` or the cached model, else train and cache one.

    Returns ``(variables, info)``; ``variables`` holds ``params``,
    ``batch_stats`` and one entry per companion network the methods need.
    Training runs in float32 whatever ``model.compute_dtype``: a bf16 run
    adapts the same source model as the float32 run it is compared with.
    """
    model = model.clone(compute_dtype="float32")
    _, adversarial = resolved_source(config, needs)
    template = init_variables(model, jax.random.PRNGKey(config.source.seed), config.image_size)
    if adversarial:
        disc_template = jax.jit(adversarial_hparams(config).discriminator().init)(  # eager Flax init is slow
            jax.random.PRNGKey(config.source.seed + 1),
            jnp.zeros((1, config.image_size, config.image_size, model.num_classes)))
        template = {**template, "discriminator": disc_template}
    if "dae" in needs.companions:
        dae = dae_hparams(config).network()
        template = {**template, "dae": jax.jit(lambda k: dae.init(
            k, jnp.zeros((1, config.image_size, config.image_size, model.num_classes))))(jax.random.PRNGKey(0))}
    if "universe" in needs.companions:
        template = {**template, "universe": jax.jit(universe_network(config, model).init)(jax.random.PRNGKey(0))}
    template = jax.device_get(template)
    if config.source_checkpoint:
        path = Path(os.path.expanduser(config.source_checkpoint))
        if not path.exists():
            raise checkpoints.CheckpointError(f"source_checkpoint {path} does not exist")
        identity = {"checkpoint": file_digest(path)}   # the content, wherever the file lives
        if path.suffix.lower() in (".pth", ".pt"):
            # official PyTorch weights (e.g. GraTa/VPTTA last-Res_Unet.pth)
            from tta_jax.source.convert import load_torch_state_dict, torch_state_dict_to_flax
            seg_template = segmentor_variables(template)
            variables, ignored = torch_state_dict_to_flax(load_torch_state_dict(path), seg_template)
            if set(template) - set(seg_template):
                raise checkpoints.CheckpointError(
                    f"{path} holds only the segmentor; the methods also need {sorted(set(template) - {'params', 'batch_stats'})}")
            return variables, {"checkpoint": str(path), "trained_now": False, "format": "pytorch",
                               "ignored_keys": ignored, "identity": identity}
        variables = checkpoints.restore_variables(path, template)
        return variables, {"checkpoint": str(path), "trained_now": False, "identity": identity}
    train = dataset.load(source, "train", config.image_size)
    train_manifest = manifest(train)
    settings = source_settings(config, needs, manifest_digest(train_manifest))
    key = content_hash(settings)
    cache = Path(os.path.expanduser(config.cache_dir)) / "source_models"
    ckpt_dir = cache / key
    identity = {"trained": key}
    if (ckpt_dir / "meta.json").exists():
        logging.info("reusing cached source model %s", ckpt_dir)
        try:
            variables = checkpoints.restore_variables(ckpt_dir, template)
            return variables, {"checkpoint": str(ckpt_dir), "trained_now": False, "identity": identity,
                               **checkpoints.load_meta(ckpt_dir).get("training", {})}
        except checkpoints.CheckpointError as e:
            logging.warning("cached source model unusable (%s); training a new one", e)
    else:
        logging.info(_explain_retraining(cache, settings, train_manifest, source))
    logging.info("training the source model on %s (%d images, %d steps)", source, train.size, config.source.steps)
    start = time.perf_counter()
    if adversarial:
        if model.aux_heads:
            raise HParamError("the adversarial source stage does not train auxiliary heads; "
                              "leave model.aux_heads empty")
        variables, history = train_adversarial_source(
            model, adversarial_hparams(config).discriminator(), segmentor_variables(template),
            template["discriminator"], train.images, train.masks,
            jax.random.PRNGKey(config.source.seed), steps=config.source.steps,
            batch_size=config.source.batch_size, lr=config.source.lr, optimizer=config.source.optimizer,
            photometric=config.source.photometric, hp=adversarial_hparams(config))
    else:
        variables, history = train_source(
            model, template, train.images, train.masks, jax.random.PRNGKey(config.source.seed),
            steps=config.source.steps, batch_size=config.source.batch_size, lr=config.source.lr,
            optimizer=config.source.optimizer, photometric=config.source.photometric,
            denoise_std=config.source.denoise_std)
    info = {"train_seconds": time.perf_counter() - start, "loss_history": history, "train_images": train.size}
    if "dae" in needs.companions:
        # the shape prior learns from the source labels alone (Karani et al.'s separate pre-training step)
        logging.info("training the mask DAE on the %d source masks (%d steps)", train.size, dae_hparams(config).steps)
        dae_variables, info["dae_loss_history"] = train_dae(train.masks, dae_hparams(config))
        variables = {**variables, "dae": dae_variables}
    if "universe" in needs.companions:
        # ttdg's universe of node embeddings, learned on the frozen segmentor's source features
        logging.info("learning the universe on the %d source images (%d steps)", train.size,
                     universe_hparams(config).steps)
        universe, info["universe_history"] = train_universe(model, segmentor_variables(variables), train.images,
                                                            train.masks, universe_hparams(config))
        variables = {**variables, "universe": universe}
    checkpoints.save_variables(ckpt_dir, variables, {"settings": settings, "training": info,
                                                     "manifest": train_manifest})
    logging.info("source model saved to %s", ckpt_dir)
    return jax.device_get(variables), {"checkpoint": str(ckpt_dir), "trained_now": True, "identity": identity,
                                       **info}
