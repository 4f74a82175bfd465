"""`latentdiff verify IMAGE…` (C2PA status, watermark detection, provenance fields) and `latentdiff keys init`."""

from __future__ import annotations

import json

import click

from latentdiff.cli.options import Command, argument, command, with_namespace


def _model_finder(opts):
    """find_model(record, shape) for verify_file: the record's model if it loads, else --model, else the shipped
    pretrained models whose image size matches (cached, so each loads once)."""
    from latentdiff.errors import LatentDiffError
    from latentdiff.pipeline import LatentDiffusion
    from latentdiff.pipeline.directory import pretrained_dir

    cache: dict[str, object] = {}

    def load(name):
        if name not in cache:
            try:
                cache[name] = LatentDiffusion.load(name)
            except (LatentDiffError, OSError):
                cache[name] = None
        return cache[name]

    def find(record, shape):
        named = []  # the record's model and --model are used whatever the image's size
        if record and isinstance(record.get("model"), dict) and record["model"].get("name"):
            named.append(record["model"]["name"])
        if opts.model:
            named.append(opts.model)
        root = pretrained_dir("fashion-mnist").parent
        shipped = [f"pretrained:{d.name}" for d in sorted(root.iterdir()) if (d / "config.json").is_file()]
        for name in named + shipped:
            m = load(name)
            if m is None:
                continue
            c, h, _w = m.image_shape
            fits = (shape[0] % h == 0 or (shape[0] - 2) % (h + 2) == 0) and (len(shape) < 3 or shape[2] == c)
            if name in named or fits:  # a shipped model only for images of its size (or a grid of it) and colour
                return m
        return None
    return find


def _text(r: dict) -> str:
    c, wm, rec = r["c2pa"], r["watermark"], r["record"]
    lines = [f"{r['file']}: {r['verdict'].upper()}"]
    if c["status"] in ("valid", "invalid"):
        signer = f", signer: {c.get('signer')}" + (" (trusted)" if c.get("trusted") else " (not a trusted root)")
        fails = f" ({', '.join(f for f in c.get('failures', []) if f != 'signingCredential.untrusted')})" \
            if c["status"] == "invalid" else ""
        lines.append(f"  C2PA: {c['status']}{fails}{signer if c['status'] == 'valid' else ''}")
    else:
        lines.append(f"  C2PA: {c['status']}" + (f" ({c['detail']})" if c.get("detail") else ""))
    if wm.get("p_value") is not None:
        lines.append(f"  watermark: {'detected' if wm['detected'] else 'not detected'}, p-value ≤ {wm['p_value']:.3g} "
                     f"(false-positive rate; threshold {wm['threshold_p']:g}) over {wm['tiles']} tile(s), "
                     f"key: {wm['key']}")
        noise, dec = wm["layers"]["noise"], wm["layers"].get("decoder")
        lines.append(f"    noise mark: correlation {noise['score']:.2f} ({noise['agree']}/{noise['bits']} key signs), "
                     f"p ≤ {noise['p_value']:.3g}")
        lines.append(f"    decoder mark: score {dec['score']:.2f} ({dec['bits']} bits), p ≤ {dec['p_value']:.3g}" if dec
                     else "    decoder mark: not tested (no decoder-mark nets for this image size)")
    else:
        lines.append(f"  watermark: not tested ({wm.get('detail')})")
    if rec:
        req = rec
        fields = {k: req.get(k) for k in ("sampler", "steps", "guidance", "seed", "labels", "prompt") if k in req}
        model = rec.get("model") or {}
        lines.append(f"  provenance: model {model.get('name')} (sha256 {str(model.get('sha256'))[:16]}…), "
                     + ", ".join(f"{k} {v}" for k, v in fields.items())
                     + (", watermark disabled (--no-watermark)" if (rec.get("watermark") or {}).get("disabled") else ""))
    else:
        lines.append("  provenance: none (no record in the file)")
    return "\n".join(lines)


@command("verify", help="Check images for latentdiff provenance: C2PA signature (valid / invalid / absent, signer), "
                        "the invisible watermark (score and p-value = false-positive rate) and the recorded fields. "
                        "Exit 0: generated (watermark or valid signature); 1: nothing detected; 3: tampered "
                        "(invalid signature); 2: usage error.")
@argument("images", nargs=-1, required=True, metavar="IMAGE...", help="PNG/GIF/JPEG files (grids are split)")
@click.option("--model", metavar="DIR", help="model to test the watermark with when the image names none "
                                              "(default: the recorded model, else shipped models of that size)")
@click.option("--p-value", "alpha", type=click.FloatRange(1e-12, 0.5), default=1e-3, show_default=True,
              help="detected when the watermark's p-value is at most this")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per image (a JSON list)")
@with_namespace
def verify(opts):
    from latentdiff.pipeline.keys import candidate_keys
    from latentdiff.pipeline.verify import exit_code, verify_file

    find, keys = _model_finder(opts), candidate_keys()
    reports = [verify_file(p, find, keys, opts.alpha) for p in opts.images]
    if opts.as_json:
        click.echo(json.dumps(reports, indent=2, default=str))
    else:
        click.echo("\n".join(_text(r) for r in reports))
    code = exit_code(reports)
    if code:
        raise click.exceptions.Exit(code)


@click.group("keys", context_settings={"help_option_names": ["-h", "--help"]}, help="Provenance keys of this installation (watermark secret, C2PA signing certificate).")
def keys():
    pass


@keys.command("init", cls=Command, help="Make a watermark secret and an ES256 root + leaf certificate chain for C2PA signing "
                           "in the config folder ($LATENTDIFF_CONFIG_DIR, else ~/.config/latentdiff).")
@click.option("--subject", default="latentdiff local signer", show_default=True, help="the signer's common name")
@click.option("--force", is_flag=True, help="replace existing keys (older outputs then no longer verify by watermark)")
def keys_init(subject, force):
    from latentdiff.errors import ConfigError
    from latentdiff.pipeline.keys import init_keys

    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ConfigError("keys init needs the `provenance` extra: pip install 'latentdiff[provenance]'") from None
    for what, path in init_keys(subject, force).items():
        click.echo(f"{what}: {path}")
    click.echo("keep watermark.key and signing-key.pem secret; give signing-root.pem to anyone who verifies")


@keys.command("show", cls=Command, help="Which keys outputs are marked and signed with now.")
def keys_show():
    from latentdiff.pipeline.keys import config_dir, signing_identity, watermark_key

    wm = watermark_key()
    ident = signing_identity()
    click.echo(f"config folder: {config_dir()}\nwatermark key: {wm.label} (id {wm.fingerprint})\n"
               f"C2PA signer: {ident.name}")
