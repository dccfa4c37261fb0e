"""Container images for the podman backend, buildable with no container registry.

Machines like this CI's reach Debian's package mirror and the Python package index but no
container registry, so ``docker.io/library/python:3.11-slim`` cannot be pulled.  Instead:

1. **Base image** ``localhost/tkv-base:bookworm``: ``debootstrap --variant=minbase bookworm``
   with python3, python3-venv, iptables, iproute2 and ca-certificates, from the same Debian
   mirror apt uses on this machine, then ``podman import``.  About a minute, once: it is kept
   in podman's image store and reused.  ``CHAOS_BASE_IMAGE`` names another base instead (e.g.
   the official slim image on a machine with registry access).
2. **Node image** ``localhost/trio-kv:chaos``: ``podman build -f Containerfile`` with
   ``--build-arg BASE_IMAGE=...``.  The host's CA bundle is mounted at ``/run/host-ca.crt`` so
   pip inside the build trusts the same TLS roots as pip on the host, and an http(s) package
   index configured on the host (``PIP_INDEX_URL``...) is passed on.  Layer caching makes a
   rebuild with unchanged dependencies take seconds.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from chaos.cluster import REPO
from chaos.util import ChaosError, run

BASE_IMAGE = "localhost/tkv-base:bookworm"
NODE_IMAGE = "localhost/trio-kv:chaos"
SUITE = "bookworm"
BASE_PACKAGES = ["python3", "python3-venv", "iptables", "iproute2", "ca-certificates"]
FALLBACK_MIRROR = "http://deb.debian.org/debian"
CA_CANDIDATES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")


def podman_common_args() -> list[str]:
    """Flags every ``podman run``/``build`` needs on these machines.

    ``runc`` (``CHAOS_PODMAN_RUNTIME`` overrides; empty means podman's default) and small
    ulimits: the default runtime and the host's huge nofile/nproc limits fail here.
    """
    runtime = os.environ.get("CHAOS_PODMAN_RUNTIME", "runc")
    args = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
    if runtime and shutil.which(runtime):
        args = ["--runtime", runtime, *args]
    return args


def image_exists(name: str) -> bool:
    """Whether podman's store has the image."""
    if shutil.which("podman") is None:
        return False
    return run(["podman", "image", "exists", name], check=False).returncode == 0


def debian_mirror(suite: str = SUITE) -> str:
    """The Debian mirror apt uses here for ``suite`` (one-line or deb822 sources)."""
    candidates: list[str] = []
    files = [Path("/etc/apt/sources.list")]
    sources_d = Path("/etc/apt/sources.list.d")
    if sources_d.is_dir():
        files += sorted(sources_d.iterdir())
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and \
                        suite in fields.get("Suites", "").split():
                    candidates += fields.get("URIs", "").split()
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    candidates.append(words[1])
    for uri in candidates:  # prefer the main archive over security/updates mirrors
        if uri.startswith("http") and "security" not in uri:
            return uri.rstrip("/")
    return FALLBACK_MIRROR


def build_base_image(name: str = BASE_IMAGE, mirror: str | None = None) -> str:
    """debootstrap a minimal bookworm with python3 and import it as ``name``."""
    if shutil.which("debootstrap") is None:
        raise ChaosError("debootstrap is not installed (apt-get install debootstrap), and no "
                         f"base image {name} is cached; or set CHAOS_BASE_IMAGE")
    mirror = mirror or debian_mirror()
    with tempfile.TemporaryDirectory(prefix="tkv-rootfs-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             SUITE, str(root), mirror], timeout=900)
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / leftover).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                ["podman", "import", "--change", 'CMD ["/bin/bash"]', "-", name],
                stdin=tar.stdout, capture_output=True, text=True, timeout=600, check=False)
        finally:
            if tar.stdout:
                tar.stdout.close()
            tar.wait(timeout=60)
        if imported.returncode != 0:
            raise ChaosError(f"podman import failed: {imported.stderr.strip()}")
    return name


def _pip_settings() -> dict[str, str]:
    """The host's pip CA bundle and http(s) index settings (env first, then pip config)."""
    found: dict[str, str] = {}
    config = configparser.ConfigParser()
    config.read(["/etc/pip.conf", os.path.expanduser("~/.config/pip/pip.conf"),
                 os.path.expanduser("~/.pip/pip.conf")])
    for key, env in (("cert", "PIP_CERT"), ("index-url", "PIP_INDEX_URL"),
                     ("extra-index-url", "PIP_EXTRA_INDEX_URL")):
        value = os.environ.get(env) or config.get("global", key, fallback="") or ""
        if key != "cert":  # file:// indexes are host paths: useless inside a build
            value = " ".join(u for u in value.split() if u.startswith(("http://", "https://")))
        if value:
            found[key] = value
    return found


def build_node_image(base: str, tag: str = NODE_IMAGE) -> str:
    """``podman build -f Containerfile`` with the local base image and host pip trust."""
    settings = _pip_settings()
    cmd = ["podman", "build", "-f", str(REPO / "Containerfile"), "--format", "docker",
           *podman_common_args(), "--build-arg", f"BASE_IMAGE={base}", "-t", tag]
    ca = settings.get("cert") or next((c for c in CA_CANDIDATES if Path(c).is_file()), None)
    if ca and Path(ca).is_file():
        cmd += ["-v", f"{ca}:/run/host-ca.crt:ro"]
    if settings.get("index-url"):
        cmd += ["--build-arg", f"PIP_INDEX_URL={settings['index-url']}"]
    if settings.get("extra-index-url"):
        cmd += ["--build-arg", f"PIP_EXTRA_INDEX_URL={settings['extra-index-url']}"]
    run([*cmd, str(REPO)], timeout=1200)
    return tag


def ensure_images(rebuild_base: bool = False) -> str:
    """The node image, building the base (once, cached) and the node image as needed."""
    if shutil.which("podman") is None:
        raise ChaosError("podman is not installed (apt-get install podman runc)")
    base = os.environ.get("CHAOS_BASE_IMAGE") or BASE_IMAGE
    if base == BASE_IMAGE and (rebuild_base or not image_exists(BASE_IMAGE)):
        build_base_image(BASE_IMAGE)
    return build_node_image(base)
