"""Hostile bundles and outputs (issue 11): verify, infer, inspect, signing keys.

One signed bundle is built per module (a real tiny run); each case copies it into its own folder as
`bundle/`, damages it, runs the real CLI, and asserts the exit code, the one-line message, no traceback,
nothing half-written and nothing of the user's touched (the damaged bundle included: verify and infer
only read). Then: a signed run is byte-identical to a second one and verifies with the key; a bundle
swapped whole passes the digest and fails the signature.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from .conftest import write_tiny_recipe
from .test_bad_inputs import (
    _invoke, assert_clean_failure, assert_nothing_half_written, assert_untouched, snapshot,
)


@dataclass(frozen=True)
class Built:
    folder: Path  # the run's folder: tiny.yaml, tiny.onnx, calib.npz, val.npz, out/, keys/, other/
    artifact: Path
    key: Path  # private
    pub: Path
    other_key: Path
    other_pub: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    folder = tmp_path_factory.mktemp("built")
    recipe = write_tiny_recipe(folder)
    for name in ("keys", "other"):
        result = _invoke(["keygen", str(folder / name)], folder)
        assert result.exit_code == 0, result.output
    result = _invoke(["run", str(recipe), "--quiet", "--sign-key", str(folder / "keys" / "signing.pem")], folder)
    assert result.exit_code == 0, result.output
    return Built(folder, folder / "out" / "artifact", folder / "keys" / "signing.pem", folder / "keys" / "signing.pub.pem",
                 folder / "other" / "signing.pem", folder / "other" / "signing.pub.pem")


@dataclass(frozen=True)
class BundleCase:
    id: str
    setup: Callable[[Path, Built], None]
    args: Callable[[Path, Built], list[str]]
    code: int
    fragments: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    owned: tuple[str, ...] = ()


def _copy(root: Path, built: Built) -> Path:
    shutil.copytree(built.artifact, root / "bundle", symlinks=True)
    return root / "bundle"


def damage(step: Callable[[Path, Built], None] | None = None) -> Callable[[Path, Built], None]:
    """Copy the built bundle to root/bundle, then apply `step(bundle, built)`."""
    def apply(root: Path, built: Built) -> None:
        bundle = _copy(root, built)
        if step is not None:
            step(bundle, built)

    return apply


def manifest(change: Callable[[dict], object], *, redigest: bool = False, replace: bool = False
             ) -> Callable[[Path, Built], None]:
    """Edit manifest.json in place with `change` (or, `replace`, by what it returns); `redigest`: recompute
    manifest_sha256 as a careful forger would."""
    def apply(bundle: Path, built: Built) -> None:
        from pipeline.core.fileio import dump_json
        from pipeline.stages.package import manifest_digest

        data = json.loads((bundle / "manifest.json").read_text())
        replaced = change(data)
        data = replaced if replace else data
        if redigest and isinstance(data, dict):
            data["manifest_sha256"] = manifest_digest(data)
        (bundle / "manifest.json").write_text(dump_json(data))

    return apply


def raw_manifest(text: str | bytes) -> Callable[[Path, Built], None]:
    def apply(bundle: Path, built: Built) -> None:
        (bundle / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())

    return apply


def _swap_model(bundle: Path, built: Built, *, relist: bool, resign: Path | None = None, unsign: bool = False) -> None:
    """Replace model.onnx by the float model (another valid model) and, like a forger, fix every hash."""
    from pipeline.core import signing
    from pipeline.core.fileio import dump_json, sha256_file
    from pipeline.stages.package import manifest_digest

    shutil.copyfile(bundle / "model.float.onnx", bundle / "model.onnx")
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"] = {"model.onnx": sha256_file(bundle / "model.onnx")} if not relist else {
        name: sha256_file(bundle / name) for name in data["files"]}
    data["manifest_sha256"] = manifest_digest(data)
    text = dump_json(data)
    (bundle / "manifest.json").write_text(text)
    if unsign:
        (bundle / signing.SIGNATURE_FILE).unlink()
    if resign is not None:
        (bundle / signing.SIGNATURE_FILE).write_text(signing.sign(text.encode(), signing.load_private_key(resign)))


def write(rel: str, data: str | bytes) -> Callable[[Path, Built], None]:
    def apply(root: Path, built: Built) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return apply


def both(*steps):
    def apply(*args):
        for step in steps:
            step(*args)

    return apply


def _npz(name: str, **arrays) -> Callable[[Path, Built], None]:
    def apply(root: Path, built: Built) -> None:
        np.savez(root / name, **arrays)

    return apply


def _rsa_public(root: Path, built: Built) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (root / "rsa.pub.pem").write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


def _rsa_private(root: Path, built: Built) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (root / "rsa.pem").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))


def _encrypted_key(root: Path, built: Built) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, Encoding, PrivateFormat

    key = Ed25519PrivateKey.generate()
    (root / "locked.pem").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"pw")))


def _recipe(root: Path, built: Built) -> None:
    write_tiny_recipe(root)


X = np.zeros((1, 1, 8, 8), np.float32)
VERIFY = lambda *extra: (lambda root, built: ["bundle", *[e(root, built) if callable(e) else e for e in extra]])  # noqa: E731
INFER = lambda *extra: (lambda root, built: ["bundle", "--input", "x.npz", *extra])  # noqa: E731
KEY = lambda root, built: str(built.pub)  # noqa: E731
MODIFIED = "manifest.json was modified"
MALFORMED = "malformed manifest"


def _case(id, setup, command, args, code, fragments, **kw) -> BundleCase:
    return BundleCase(id, setup, lambda root, built: [command, *args(root, built)], code, fragments, **kw)


CASES = [
    # --- verify: the manifest itself ---------------------------------------------------------------------
    _case("verify-manifest-name-edited", damage(manifest(lambda m: m.update(name="evil"))), "verify", VERIFY(), 6,
          ("bundle", MODIFIED)),
    _case("verify-manifest-gates-flipped", damage(manifest(lambda m: m.update(gates_passed=False))), "verify", VERIFY(),
          6, (MODIFIED,)),
    _case("verify-manifest-no-digest", damage(manifest(lambda m: m.pop("manifest_sha256"))), "verify", VERIFY(), 6,
          (MALFORMED, "'manifest_sha256' is missing", "older version")),
    _case("verify-manifest-no-target", damage(manifest(lambda m: m.pop("target"), redigest=True)), "verify", VERIFY(),
          6, ("manifest.json", MALFORMED, "'target' is missing")),
    _case("verify-manifest-is-a-list", damage(manifest(lambda m: [m], replace=True)), "verify", VERIFY(), 6,
          (MALFORMED, "JSON list, not an object")),
    _case("verify-manifest-is-null", damage(raw_manifest("null")), "verify", VERIFY(), 6, (MALFORMED, "NoneType")),
    _case("verify-manifest-is-a-string", damage(raw_manifest('"hello"')), "verify", VERIFY(), 6, (MALFORMED, "str")),
    _case("verify-manifest-not-json", damage(raw_manifest("{not json")), "verify", VERIFY(), 6,
          ("manifest.json", "not valid JSON")),
    _case("verify-manifest-deeply-nested", damage(raw_manifest("[" * 100_000 + "]" * 100_000)), "verify", VERIFY(), 6,
          ("manifest.json", "not valid JSON", "nested too deeply")),
    _case("verify-manifest-not-utf8", damage(raw_manifest(b'{"name": "caf\xe9"}')), "verify", VERIFY(), 6,
          ("manifest.json", "not valid JSON")),
    _case("verify-manifest-empty-file", damage(raw_manifest("")), "verify", VERIFY(), 6, ("not valid JSON",)),
    _case("verify-manifest-unknown-target", damage(manifest(lambda m: m.update(target="xdna9"), redigest=True)),
          "verify", VERIFY(), 6, (MALFORMED, "target/format", "xdna9")),
    _case("verify-manifest-format-not-taken", damage(manifest(lambda m: m.update(target="cpu", format="bf16"),
                                                              redigest=True)), "verify", VERIFY(), 6,
          (MALFORMED, "target/format", "bf16")),
    _case("verify-manifest-target-is-a-number", damage(manifest(lambda m: m.update(target=7), redigest=True)),
          "verify", VERIFY(), 6, (MALFORMED, "'target' is a int")),
    _case("verify-manifest-files-a-list", damage(manifest(lambda m: m.update(files=["model.onnx"]), redigest=True)),
          "verify", VERIFY(), 6, (MALFORMED, "'files' is a list")),
    _case("verify-manifest-hash-not-hex", damage(manifest(lambda m: m["files"].update({"model.onnx": "zz"}),
                                                          redigest=True)), "verify", VERIFY(), 6,
          (MALFORMED, "files.model.onnx", "not a sha256")),
    _case("verify-manifest-signature-no-inputs", damage(manifest(lambda m: m["signature"].pop("inputs"), redigest=True)),
          "verify", VERIFY(), 6, (MALFORMED, "signature.inputs")),
    _case("verify-manifest-signature-bad-shape",
          damage(manifest(lambda m: m["signature"]["inputs"][0].update(shape="1x8"), redigest=True)),
          "verify", VERIFY(), 6, (MALFORMED, "signature.inputs")),
    _case("verify-manifest-over-limit", damage(), "verify", VERIFY(), 6,
          ("manifest.json", "over the limit of 100", "NPU_PIPELINE_MAX_MANIFEST_BYTES"),
          env=(("NPU_PIPELINE_MAX_MANIFEST_BYTES", "100"),)),
    _case("verify-manifest-is-a-symlink",
          damage(lambda b, built: ((b / "manifest.json").unlink(), (b / "manifest.json").symlink_to(built.artifact / "manifest.json"))),
          "verify", VERIFY(), 6, ("no manifest.json",)),
    # --- verify: the file set and the paths the manifest names ----------------------------------------------
    _case("verify-file-added", damage(write("extra.json", "{}")), "verify", VERIFY(), 6,
          ("extra.json is not listed in manifest.json",)),
    _case("verify-hidden-file-added", damage(write(".DS_Store", "x")), "verify", VERIFY(), 6,
          (".DS_Store is not listed",)),
    _case("verify-folder-added", damage(write("plugins/evil.so", "x")), "verify", VERIFY(), 6,
          ("plugins is not listed",)),
    _case("verify-temp-file-left", damage(write(".model.onnx.abcd1234.tmp", "x")), "verify", VERIFY(), 6,
          (".model.onnx.abcd1234.tmp is not listed",)),
    _case("verify-files-emptied-model-swapped",
          damage(lambda b, built: (shutil.copyfile(b / "model.float.onnx", b / "model.onnx"),
                                   manifest(lambda m: m.update(files={}), redigest=True)(b, built))),
          "verify", VERIFY(), 6, ("manifest.json does not list model.onnx", "model.onnx is not listed")),
    _case("verify-files-emptied", damage(manifest(lambda m: m.update(files={}))), "verify", VERIFY(), 6,
          (MODIFIED, "does not list model.onnx")),
    _case("verify-lists-parent-path", damage(manifest(lambda m: m["files"].update({"../tiny.yaml": "0" * 64}),
                                                      redigest=True)), "verify", VERIFY(), 6,
          ("'../tiny.yaml'", "not a file name inside the bundle")),
    _case("verify-lists-absolute-path", damage(manifest(lambda m: m["files"].update({"/etc/hostname": "0" * 64}),
                                                        redigest=True)), "verify", VERIFY(), 6,
          ("'/etc/hostname'", "not a file name inside the bundle")),
    _case("verify-lists-subfolder-path", damage(manifest(lambda m: m["files"].update({"sub/x.json": "0" * 64}),
                                                         redigest=True)), "verify", VERIFY(), 6,
          ("'sub/x.json'", "not a file name inside")),
    _case("verify-lists-hidden-name", damage(manifest(lambda m: m["files"].update({".env": "0" * 64}), redigest=True)),
          "verify", VERIFY(), 6, ("'.env'", "not a file name inside")),
    _case("verify-model-missing", damage(lambda b, built: (b / "model.onnx").unlink()), "verify", VERIFY(), 6,
          ("model.onnx is missing",)),
    _case("verify-model-edited", damage(lambda b, built: (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes() + b"\0")),
          "verify", VERIFY(), 6, ("model.onnx does not match its sha256",)),
    _case("verify-model-is-a-symlink-out",
          damage(lambda b, built: ((b / "model.onnx").unlink(), (b / "model.onnx").symlink_to(built.artifact / "model.onnx"))),
          "verify", VERIFY(), 6, ("model.onnx is a symbolic link",)),
    _case("verify-placement-edited", damage(lambda b, built: (b / "placement.json").write_text("{}\n")), "verify",
          VERIFY(), 6, ("placement.json does not match",)),
    _case("verify-stage-json-a-folder",
          damage(lambda b, built: ((b / "stage.json").unlink(), (b / "stage.json").mkdir())), "verify", VERIFY(), 6,
          ("stage.json is not listed",)),
    _case("verify-report-a-symlink",
          damage(lambda b, built: ((b / "report.md").unlink(), (b / "report.md").symlink_to("/etc/hostname"))),
          "verify", VERIFY(), 6, ("report.md is not listed",)),
    _case("verify-cache-is-a-file", damage(write("vitisai_cache", "x")), "verify", VERIFY(), 6,
          ("vitisai_cache is not listed",)),
    _case("verify-two-problems-at-once",
          damage(both(write("extra.txt", "x"), lambda b, built: (b / "placement.json").write_text("{}\n"))),
          "verify", VERIFY(), 6, ("placement.json does not match", "extra.txt is not listed")),
    _case("verify-not-a-bundle", write("bundle/readme.txt", "x"), "verify", VERIFY(), 6, ("no manifest.json",)),
    _case("verify-path-is-a-file", write("bundle", "x"), "verify", VERIFY(), 6, ("not a folder",)),
    _case("verify-path-missing", lambda root, built: None, "verify", VERIFY(), 6, ("not a folder",)),
    # --- verify: signatures ------------------------------------------------------------------------------
    _case("verify-swapped-whole-resigned-by-other-key",
          damage(lambda b, built: _swap_model(b, built, relist=True, resign=built.other_key)),
          "verify", VERIFY("--key", KEY), 6, ("manifest.sig does not verify", "signed by another key")),
    _case("verify-swapped-whole-old-signature",
          damage(lambda b, built: _swap_model(b, built, relist=True)), "verify", VERIFY("--key", KEY), 6,
          ("manifest.sig does not verify",)),
    _case("verify-swapped-whole-unsigned",
          damage(lambda b, built: _swap_model(b, built, relist=True, unsign=True)), "verify", VERIFY("--key", KEY), 6,
          ("not signed", "--sign-key")),
    _case("verify-signature-garbage", damage(write("manifest.sig", "not base64 !!\n")), "verify",
          VERIFY("--key", KEY), 6, ("manifest.sig does not verify",)),
    _case("verify-signature-empty", damage(write("manifest.sig", "")), "verify", VERIFY("--key", KEY), 6,
          ("does not verify",)),
    _case("verify-signed-key-of-someone-else", damage(), "verify",
          VERIFY("--key", lambda root, built: str(built.other_pub)), 6, ("does not verify",)),
    _case("verify-key-missing-file", damage(), "verify", VERIFY("--key", "nope.pem"), 2, ("--key", "nope.pem", "no such key")),
    _case("verify-key-is-the-private-key", damage(), "verify", VERIFY("--key", lambda root, built: str(built.key)), 2,
          ("--key", "not a PEM public key", "private key")),
    _case("verify-key-not-pem", both(damage(), write("key.pem", "hello\n")), "verify", VERIFY("--key", "key.pem"), 2,
          ("--key", "key.pem", "not a PEM public key")),
    _case("verify-key-rsa", both(damage(), _rsa_public), "verify", VERIFY("--key", "rsa.pub.pem"), 2,
          ("--key", "not an Ed25519 public key")),
    _case("verify-key-huge-file", both(damage(), write("key.pem", "x" * 200_000)), "verify", VERIFY("--key", "key.pem"), 2,
          ("--key", "not a PEM key file")),
    # --- infer -------------------------------------------------------------------------------------------
    _case("infer-edited-signature", both(damage(manifest(lambda m: m["signature"]["inputs"][0].update(shape=[1, 2]))),
                                         _npz("x.npz", x=X)), "infer", INFER(), 6, (MODIFIED,)),
    _case("infer-edited-signature-redigested",
          both(damage(manifest(lambda m: m["signature"]["inputs"][0].update(shape=[1, 2]), redigest=True)),
               _npz("x.npz", x=X)), "infer", INFER(), 2, ("--input", "'x'", "float32[1, 1, 8, 8]", "[1, 2]")),
    _case("infer-edited-signature-name", both(damage(manifest(lambda m: m["signature"]["inputs"][0].update(name=None))),
                                              _npz("x.npz", x=X)), "infer", INFER(), 6, (MALFORMED, "signature.inputs")),
    _case("infer-bundle-with-added-file", both(damage(write("evil.py", "x")), _npz("x.npz", x=X)), "infer",
          INFER(), 6, ("evil.py is not listed",)),
    _case("infer-model-swapped", both(damage(lambda b, built: shutil.copyfile(b / "model.float.onnx", b / "model.onnx")),
                                      _npz("x.npz", x=X)), "infer", INFER(), 6, ("model.onnx does not match",)),
    _case("infer-input-npy", both(damage(), lambda root, built: np.save(open(root / "x.npz", "wb"), X)), "infer", INFER(), 2,
          ("--input", "x.npz", ".npy file", "numpy.savez")),
    _case("infer-input-named-npy", both(damage(), lambda root, built: np.save(root / "x.npy", X)), "infer",
          lambda root, built: ["bundle", "--input", "x.npy"], 2, ("--input", "x.npy", ".npy file")),
    _case("infer-input-text", both(damage(), write("x.npz", "1,2,3\n")), "infer", INFER(), 2,
          ("--input", "not an .npz file")),
    _case("infer-input-missing", damage(), "infer", INFER(), 2, ("--input", "x.npz", "does not exist")),
    _case("infer-input-folder", both(damage(), lambda root, built: (root / "x.npz").mkdir()), "infer", INFER(), 2,
          ("--input", "does not exist")),
    _case("infer-input-wrong-name", both(damage(), _npz("x.npz", image=X)), "infer", INFER(), 2,
          ("--input", "no array 'x'", "image")),
    _case("infer-input-wrong-dtype", both(damage(), _npz("x.npz", x=X.astype(np.float64))), "infer", INFER(), 2,
          ("--input", "float64", "float32")),
    _case("infer-input-wrong-shape", both(damage(), _npz("x.npz", x=np.zeros((2, 1, 8, 8), np.float32))), "infer",
          INFER(), 2, ("--input", "[2, 1, 8, 8]")),
    _case("infer-input-object-array", both(damage(), _npz("x.npz", x=np.array([None], dtype=object))), "infer",
          INFER(), 2, ("--input", "pickle")),
    _case("infer-input-member-over-limit", both(damage(), _npz("x.npz", x=X)), "infer", INFER(), 2,
          ("--input", "array 'x'", "NPU_PIPELINE_MAX_NPZ_MEMBER_BYTES"), env=(("NPU_PIPELINE_MAX_NPZ_MEMBER_BYTES", "64"),)),
    _case("infer-output-parent-is-a-file", both(damage(), _npz("x.npz", x=X), write("blocker", "x")), "infer",
          INFER("--output", "blocker/y.npz"), 2, ("--output", "blocker/y.npz", "cannot write")),
    _case("infer-output-inside-bundle", both(damage(), _npz("x.npz", x=X)), "infer",
          INFER("--output", "bundle/model.onnx"), 2, ("--output", "inside the bundle")),
    _case("infer-output-is-a-folder", both(damage(), _npz("x.npz", x=X), lambda root, built: (root / "y").mkdir()),
          "infer", INFER("--output", "y"), 2, ("--output", "cannot write")),
    _case("infer-output-in-proc", both(damage(), _npz("x.npz", x=X)), "infer", INFER("--output", "/proc/y.npz"), 2,
          ("--output", "/proc/y.npz", "cannot write")),
    # --- inspect --json ----------------------------------------------------------------------------------
    _case("inspect-json-parent-is-a-file", both(damage(), write("blocker", "x")), "inspect",
          lambda root, built: ["bundle/model.onnx", "--json", "blocker/p.json"], 2, ("--json", "blocker/p.json")),
    _case("inspect-json-is-the-model", damage(), "inspect", lambda root, built: ["bundle/model.onnx", "--json",
                                                                                  "bundle/model.onnx"], 2,
          ("--json", "the model being inspected")),
    _case("inspect-json-is-a-folder", both(damage(), lambda root, built: (root / "p.json").mkdir()), "inspect",
          lambda root, built: ["bundle/model.onnx", "--json", "p.json"], 2, ("--json", "p.json", "cannot write")),
    _case("inspect-json-in-proc", damage(), "inspect", lambda root, built: ["bundle/model.onnx", "--json", "/proc/p.json"],
          2, ("--json", "/proc/p.json")),
    _case("inspect-model-is-text", write("m.onnx", "hello"), "inspect", lambda root, built: ["m.onnx"], 2,
          ("m.onnx", "not a readable ONNX")),
    _case("inspect-unknown-target", damage(), "inspect", lambda root, built: ["bundle/model.onnx", "--target", "npu9"],
          2, ("unknown target 'npu9'",)),
    # --- signing keys for run / package, keygen ------------------------------------------------------------
    _case("run-sign-key-missing", _recipe, "run", lambda root, built: ["tiny.yaml", "--quiet", "--sign-key", "nope.pem"],
          2, ("--sign-key", "nope.pem", "no such key")),
    _case("run-sign-key-is-public", _recipe, "run",
          lambda root, built: ["tiny.yaml", "--quiet", "--sign-key", str(built.pub)], 2,
          ("--sign-key", "not a PEM private key")),
    _case("run-sign-key-encrypted-without-password", both(_recipe, _encrypted_key), "run",
          lambda root, built: ["tiny.yaml", "--quiet", "--sign-key", "locked.pem"], 2,
          ("--sign-key", "locked.pem", "NPU_PIPELINE_SIGN_KEY_PASSWORD")),
    _case("run-sign-key-wrong-password", both(_recipe, _encrypted_key), "run",
          lambda root, built: ["tiny.yaml", "--quiet", "--sign-key", "locked.pem"], 2,
          ("--sign-key", "wrong password"), env=(("NPU_PIPELINE_SIGN_KEY_PASSWORD", "guess"),)),
    _case("run-sign-key-rsa", both(_recipe, _rsa_private), "run",
          lambda root, built: ["tiny.yaml", "--quiet", "--sign-key", "rsa.pem"], 2,
          ("--sign-key", "not an Ed25519 private key")),
    _case("package-sign-key-garbage", both(_recipe, write("k.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n")), "package",
          lambda root, built: ["tiny.yaml", "--sign-key", "k.pem"], 2, ("--sign-key", "k.pem", "not a PEM private key")),
    _case("export-sign-key-refused", _recipe, "export",
          lambda root, built: ["tiny.yaml", "--sign-key", str(built.key)], 2, ("--sign-key", "only 'package'")),
    _case("keygen-never-overwrites", write("keys/signing.pem", "the user's own key\n"), "keygen",
          lambda root, built: ["keys"], 2, ("signing.pem", "already exists", "never overwrites")),
    _case("keygen-folder-is-a-file", write("keys", "x"), "keygen", lambda root, built: ["keys"], 2,
          ("keygen", "cannot write")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_bundle(case: BundleCase, built: Built, tmp_path: Path, monkeypatch):
    case.setup(tmp_path, built)
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    before = snapshot(tmp_path, case.owned)
    built_before = snapshot(built.folder)
    result = _invoke(case.args(tmp_path, built), tmp_path)
    print(result.stderr)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, case.code, case.fragments)
    assert_nothing_half_written(tmp_path, before)
    assert_untouched(before, tmp_path, case.owned)
    assert_untouched(built_before, built.folder, ())


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


# --- what signing is for ---------------------------------------------------------------------------------------


def test_signed_bundle_verifies_with_its_key_only(built: Built):
    result = _invoke(["verify", str(built.artifact), "--key", str(built.pub)], built.folder)
    assert result.exit_code == 0, result.output
    assert "signature verified (key " in result.stdout
    unchecked = _invoke(["verify", str(built.artifact)], built.folder)
    assert unchecked.exit_code == 0 and "not checked (pass --key)" in unchecked.stdout


def test_a_bundle_swapped_whole_passes_the_digest_but_not_the_signature(built: Built, tmp_path: Path):
    """A forger who recomputes every hash and the manifest digest gets past verify without a key; the
    signature is what tells the user's bundle from theirs."""
    bundle = _copy(tmp_path, built)
    _swap_model(bundle, built, relist=True)
    assert _invoke(["verify", str(bundle)], tmp_path).exit_code == 0
    result = _invoke(["verify", str(bundle), "--key", str(built.pub)], tmp_path)
    assert result.exit_code == 6 and "does not verify" in result.stderr


def test_signed_runs_are_byte_identical(built: Built, tmp_path: Path):
    """Ed25519 signatures are deterministic: a second clean signed run matches in every file but report.md."""
    recipe = write_tiny_recipe(tmp_path)
    result = _invoke(["run", str(recipe), "--quiet", "--sign-key", str(built.key)], tmp_path)
    assert result.exit_code == 0, result.output
    ours, theirs = tmp_path / "out" / "artifact", built.artifact
    names = sorted(p.name for p in ours.iterdir() if p.name != "report.md")
    assert names == sorted(p.name for p in theirs.iterdir() if p.name != "report.md")
    assert "manifest.sig" in names and "stage.json" in names
    assert [n for n in names if (ours / n).read_bytes() != (theirs / n).read_bytes()] == []


def test_another_key_or_none_repackages(built: Built, tmp_path: Path):
    """The key's fingerprint is part of the package stage's key: signing with another key, or none, reruns
    package only, and the unsigned bundle has no signature left over."""
    recipe = write_tiny_recipe(tmp_path)
    assert _invoke(["run", str(recipe), "--quiet", "--sign-key", str(built.key)], tmp_path).exit_code == 0
    again = _invoke(["run", str(recipe), "--quiet"], tmp_path)
    assert again.exit_code == 0
    assert "package    cached" not in again.stdout and "validate   cached (unchanged)" in again.stdout
    assert not (tmp_path / "out" / "artifact" / "manifest.sig").exists()
