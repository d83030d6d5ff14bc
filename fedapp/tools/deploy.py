"""Real deployment: credentials for TLS and SuperNode authentication, the `flwr` CLI
connection, and Flower processes started and stopped by pid.

A deployment is one SuperLink (one HTTPS port for SuperNodes and the `flwr` CLI) and one
SuperNode per client machine. TLS needs a CA whose certificate every SuperNode and CLI user
trusts, and a SuperLink certificate naming the host(s) they dial; SuperNode authentication
needs one EC key pair per SuperNode (OpenSSH format), its public key registered with
`flwr supernode register`. The scripts in `scripts/deploy/` and the deployment tests share
this module.

    python -m fedapp.tools.deploy tls --out certs --host flower.example.org --host 10.0.0.5
    python -m fedapp.tools.deploy node-key --out keys/supernode-0
    python -m fedapp.tools.deploy connection --name fedlink --address flower.example.org:8000 \
        --root-certificates certs/ca.crt
    python -m fedapp.tools.deploy wait-port 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import tomli
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML
from flwr.cli.flower_config import serialize_superlink_connection
from flwr.cli.typing import SuperLinkConnection

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365


# ---------------------------------------------------------------------------- credentials
@dataclass(frozen=True)
class TlsFiles:
    """Where `write_tls` put the CA and the SuperLink's certificate and key (PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """IP addresses as IPAddress entries, everything else as DNS names."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # de-duplicated, order kept
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
                 signing_key: ec.EllipticCurvePrivateKey, is_ca: bool) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_tls(out_dir: Path, hosts: Sequence[str] = ()) -> TlsFiles:
    """A fresh CA and a SuperLink certificate signed by it, valid for `hosts` plus
    127.0.0.1 and localhost (the SuperLink's own ServerApp runtime dials those).

    SuperNodes and `flwr` users need only `ca.crt`; `superlink.key` and `ca.key` stay on
    the SuperLink host (or offline). Refuses to overwrite an existing CA, since replacing
    it breaks every deployed SuperNode's trust.
    """
    files = TlsFiles(out_dir / "ca.crt", out_dir / "ca.key", out_dir / "superlink.crt",
                     out_dir / "superlink.key")
    if files.ca_cert.exists():
        raise FileExistsError(f"{files.ca_cert} exists; choose another --out or delete it")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedapp Flower CA")
    ca_cert = (_certificate(ca_name, ca_name, ca_key.public_key(), ca_key, is_ca=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    all_hosts = [*hosts, *DEFAULT_HOSTS]
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (_certificate(_name(all_hosts[0]), ca_name, server_key.public_key(), ca_key,
                                is_ca=False)
                   .add_extension(_san(all_hosts), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    _write(files.ca_cert, ca_cert.public_bytes(pem))
    _write(files.ca_key, _private_pem(ca_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(pem))
    _write(files.server_key, _private_pem(server_key), private=True)
    return files


def write_node_key(private_path: Path) -> Path:
    """An EC P-384 key pair for SuperNode authentication, both in OpenSSH format: the
    private key at `private_path` (for `flower-supernode --auth-supernode-private-key`),
    the public key at `<private_path>.pub` (for `flwr supernode register`). Returns the
    public key's path."""
    if private_path.exists():
        raise FileExistsError(f"{private_path} exists; a SuperNode keeps its key")
    key = ec.generate_private_key(ec.SECP384R1())
    _write(private_path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return _write(private_path.with_name(private_path.name + ".pub"), public + b"\n")


# ---------------------------------------------------------------------------- flwr CLI
def write_connection(flwr_home: Path, name: str, address: str,
                     root_certificates: Path | None = None, insecure: bool = False) -> Path:
    """Add (or replace) `[superlink.<name>]` in `$FLWR_HOME/config.toml`, the file the
    `flwr` CLI reads connections from; other connections (and flwr's defaults, such as
    `local`, in a new file) are kept. Returns the file."""
    if (root_certificates is None) == (not insecure):
        raise ValueError(f"connection '{name}': root_certificates={root_certificates}, "
                         f"insecure={insecure}; allowed: exactly one of a CA certificate "
                         "(TLS) or insecure=True")
    connection = SuperLinkConnection(
        name=name, address=address, insecure=True if insecure else None,
        root_certificates=str(root_certificates.resolve()) if root_certificates else None)
    path = flwr_home / "config.toml"
    config = tomli.loads(path.read_text() if path.exists() else DEFAULT_FLOWER_CONFIG_TOML)
    config.setdefault("superlink", {})[name] = serialize_superlink_connection(connection)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


# ---------------------------------------------------------------------------- processes
def wait_for_port(host: str, port: int, timeout: float = 60.0,
                  proc: subprocess.Popen | None = None) -> None:
    """Return once something accepts TCP connections on host:port; raise after `timeout`
    or as soon as `proc` (the process expected to listen) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before "
                               f"listening on {host}:{port}")
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def start_process(cmd: Sequence[str], log_path: Path, env: dict[str, str],
                  cwd: Path) -> subprocess.Popen:
    """Start a long-running Flower process with its output in `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(list(cmd), stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd)


def descendants(pid: int) -> list[psutil.Process]:
    """The processes `pid` started (and theirs); empty if it is gone."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_pids(processes: Sequence[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after `timeout`. Takes
    `psutil.Process` objects, so a recycled pid is never signalled."""
    for proc in processes:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process this code started and the helpers it started (the SuperLink's and
    SuperNode's SuperExec and app processes), by pid: SIGTERM, then SIGKILL."""
    family = descendants(proc.pid)  # before it dies: orphans lose their parent link
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    stop_pids([p for p in family if p.is_running()], timeout)


# ---------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tls = sub.add_parser("tls", help="a CA and the SuperLink's certificate and key")
    tls.add_argument("--out", type=Path, required=True, help="folder for the PEM files")
    tls.add_argument("--host", action="append", default=[],
                     help="a name or IP the SuperLink is reached at (repeat); "
                          "127.0.0.1 and localhost are always included")
    key = sub.add_parser("node-key", help="an EC P-384 key pair for one SuperNode")
    key.add_argument("--out", type=Path, required=True,
                     help="private key path; the public key goes to <out>.pub")
    conn = sub.add_parser("connection", help="write a SuperLink connection for `flwr`")
    conn.add_argument("--name", required=True)
    conn.add_argument("--address", required=True, help="host:port of the SuperLink")
    group = conn.add_mutually_exclusive_group(required=True)
    group.add_argument("--root-certificates", type=Path, help="the CA certificate (TLS)")
    group.add_argument("--insecure", action="store_true", help="plain HTTP")
    conn.add_argument("--flwr-home", type=Path,
                      default=Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
    wait = sub.add_parser("wait-port", help="wait until host:port accepts connections")
    wait.add_argument("address", help="host:port")
    wait.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    if args.command == "tls":
        files = write_tls(args.out, args.host)
        print(f"CA {files.ca_cert}; SuperLink certificate {files.server_cert} for "
              f"{', '.join([*args.host, *DEFAULT_HOSTS])}")
    elif args.command == "node-key":
        print(f"private key {args.out}; public key {write_node_key(args.out)}")
    elif args.command == "connection":
        path = write_connection(args.flwr_home, args.name, args.address,
                                args.root_certificates, args.insecure)
        print(f"connection '{args.name}' -> {args.address} written to {path}")
    else:
        host, _, port = args.address.rpartition(":")
        wait_for_port(host or "127.0.0.1", int(port), args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
