"""ClientMaterial: credential files re-read when they change (including Kubernetes-style
symlink swaps), problems reported once, and a fingerprint that follows the material."""

from __future__ import annotations

import os
from pathlib import Path

import trustme

from m2m_proxy.config import AuthMethod, ClientCertificate, ClientConfig, Secret, SigningKey
from m2m_proxy.tokens.material import ClientMaterial, MaterialChange
from tests.pki import issue
from tests.unit.test_config_loader import _key_file


class SecretVolume:
    """A directory laid out like a Kubernetes secret volume: ``secret`` is a symlink
    to ``..data/secret``, and ``..data`` is a symlink swapped atomically on update."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        (root / "secret").symlink_to("..data/secret")

    def publish(self, value: str) -> None:
        self.generation += 1
        target = self.root / f"..2026_{self.generation}"
        target.mkdir()
        (target / "secret").write_text(value + "\n")
        link = self.root / "..data_tmp"
        link.symlink_to(target.name)
        os.replace(link, self.root / "..data")  # the atomic swap kubelet does

    @property
    def path(self) -> str:
        return str(self.root / "secret")


def secret_client(*files: str) -> ClientConfig:
    values = [Secret(Path(f).read_text().strip()) for f in files]
    return ClientConfig(
        name="orders",
        token_url="https://idp.example.com/token",
        client_id="orders-id",
        client_secret=values[0],
        fallback_secrets=tuple(values[1:]),
        auth_method=AuthMethod.CLIENT_SECRET_BASIC,
        secret_files=files,
    )


def test_a_symlink_swap_is_seen_and_the_new_secret_used(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path)
    volume.publish("old-secret")
    seen: list[MaterialChange] = []
    material = ClientMaterial({"orders": secret_client(volume.path)}, on_change=seen.append)
    before = material.fingerprint("orders")
    assert material.refresh() == []
    volume.publish("new-secret")
    [change] = material.refresh()
    assert seen == [change]
    assert change.client == "orders"
    assert change.fingerprint == material.fingerprint("orders") != before
    secret = material.client("orders").client_secret
    assert secret is not None
    assert secret.value == "new-secret"
    assert material.refresh() == []  # seen once


def test_rewriting_the_same_secret_is_no_change(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path)
    volume.publish("same")
    material = ClientMaterial({"orders": secret_client(volume.path)})
    before = material.fingerprint("orders")
    volume.publish("same")
    assert material.refresh() == []
    assert material.fingerprint("orders") == before


def test_an_empty_or_missing_file_keeps_the_old_secret_and_is_reported_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "secret"
    path.write_text("first")
    problems: list[tuple[str, str]] = []
    material = ClientMaterial(
        {"orders": secret_client(str(path))},
        on_problem=lambda client, detail: problems.append((client, detail)),
    )
    path.write_text("")
    assert material.refresh() == []
    os.utime(path, ns=(1, 1))
    assert material.refresh() == []
    path.unlink()
    assert material.refresh() == []
    assert [d.split(";")[0] for _, d in problems] == [
        f"'{path}' is empty",
        f"cannot read '{path}' (No such file or directory)",
    ]
    secret = material.client("orders").client_secret
    assert secret is not None
    assert secret.value == "first"
    path.write_text("second")
    assert len(material.refresh()) == 1
    secret = material.client("orders").client_secret
    assert secret is not None
    assert secret.value == "second"


def test_rotation_lists_reread_every_file_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text("one")
    second.write_text("two")
    material = ClientMaterial({"orders": secret_client(str(first), str(second))})
    second.write_text("three")
    material.refresh()
    client = material.client("orders")
    assert [s.value for s in client.fallback_secrets] == ["three"]
    assert client.client_secret is not None
    assert client.client_secret.value == "one"


def test_the_fingerprint_reveals_nothing_and_is_per_process(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("hunter2")
    one = ClientMaterial({"orders": secret_client(str(path))})
    two = ClientMaterial({"orders": secret_client(str(path))})
    assert one.fingerprint("orders") != two.fingerprint("orders")  # keyed per instance
    assert "hunter2" not in one.fingerprint("orders")
    assert len(one.fingerprint("orders")) == 16


def test_a_rotated_private_key_is_reread(tmp_path: Path) -> None:
    key_file = _key_file(tmp_path)
    client = ClientConfig(
        name="orders",
        token_url="https://idp.example.com/token",
        client_id="orders-id",
        client_secret=None,
        auth_method=AuthMethod.PRIVATE_KEY_JWT,
        signing_key=SigningKey(Secret(key_file.read_text()), "ES256", file=str(key_file)),
    )
    material = ClientMaterial({"orders": client})
    (tmp_path / "new").mkdir()
    other = _key_file(tmp_path / "new")  # a new key, then moved over the old path
    os.replace(other, key_file)
    assert len(material.refresh()) == 1
    key = material.client("orders").signing_key
    assert key is not None
    assert key.pem.value == key_file.read_text().strip()


def test_a_rotated_certificate_rebuilds_the_tls_context(tmp_path: Path) -> None:
    ca = trustme.CA()
    files = issue(ca, tmp_path, "client", "svc.example", cn="svc")
    client = ClientConfig(
        name="orders",
        token_url="https://idp.example.com/token",
        client_id="orders-id",
        client_secret=None,
        auth_method=AuthMethod.TLS_CLIENT_AUTH,
        certificate=ClientCertificate(str(files.cert), str(files.key)),
    )
    material = ClientMaterial({"orders": client})
    context = material.idp_context("orders")
    assert context is not None
    assert material.idp_context("orders") is context  # built once
    issue(ca, tmp_path, "client", "svc.example", cn="svc")  # renewed in place
    assert len(material.refresh()) == 1
    assert material.idp_context("orders") is not context


def test_a_mismatched_certificate_and_key_keep_the_old_pair(tmp_path: Path) -> None:
    ca = trustme.CA()
    files = issue(ca, tmp_path, "client", "svc.example")
    client = ClientConfig(
        name="orders",
        token_url="https://idp.example.com/token",
        client_id="orders-id",
        client_secret=None,
        auth_method=AuthMethod.TLS_CLIENT_AUTH,
        certificate=ClientCertificate(str(files.cert), str(files.key)),
    )
    problems: list[str] = []
    material = ClientMaterial({"orders": client}, on_problem=lambda _c, d: problems.append(d))
    before = material.fingerprint("orders")
    other = issue(ca, tmp_path, "other", "svc.example")
    files.cert.write_bytes(other.cert.read_bytes())  # the cert rotated, its key not yet
    assert material.refresh() == []
    assert material.fingerprint("orders") == before
    assert len(problems) == 1
    assert str(files.cert) in problems[0]
    assert "PRIVATE" not in problems[0]
