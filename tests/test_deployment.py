"""Real deployment on 127.0.0.1: a SuperLink and SuperNodes as separate processes, TLS and
SuperNode authentication, started through `scripts/deploy/` and driven by `fedapp.tools.submit`
(slow); and the credentials and CLI connection checked against what flwr reads (fast).

Every process a test starts (and the SuperExec/app processes those start) is stopped by pid
at the end, pass or fail. All state (Flower homes, databases, certificates, run dirs) lives
under `tmp_path`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.supernode.register import try_load_public_key

from fedapp.server.report import read_metrics
from fedapp.tools.deploy import write_connection, write_node_key, write_tls
from fedapp.tools.loopback import LoopbackFederation

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ("scenario=two_clients train.max_length=64 eval.max_examples=16 partitioner=iid "
            "strategy.ranks=[2,4]")


# ---------------------------------------------------------------------- credentials, fast
def test_superlink_certificate_names_its_hosts_and_is_signed_by_the_ca(tmp_path):
    tls = write_tls(tmp_path, ["flower.example.org", "10.0.0.5"])

    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["flower.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5",
                                                                           "127.0.0.1"]
    assert tls.server_key.stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError, match="ca.crt"):
        write_tls(tmp_path)


def test_node_key_pair_is_what_flower_accepts(tmp_path):
    public_path = write_node_key(tmp_path / "supernode-0")

    private = load_ssh_private_key((tmp_path / "supernode-0").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert try_load_public_key(public_path)  # what `flwr supernode register` does


def test_connections_are_read_back_by_the_flwr_cli(tmp_path, monkeypatch):
    (tmp_path / "ca.crt").write_text("pem")
    write_connection(tmp_path, "tls", "flower.example.org:8000", tmp_path / "ca.crt")
    write_connection(tmp_path, "plain", "127.0.0.1:8000", insecure=True)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))

    tls, plain = read_superlink_connection("tls"), read_superlink_connection("plain")

    assert (tls.address, tls.root_certificates, tls.insecure) == (
        "flower.example.org:8000", str((tmp_path / "ca.crt").resolve()), False)
    assert (plain.address, plain.root_certificates, plain.insecure) == (
        "127.0.0.1:8000", None, True)
    assert read_superlink_connection("local").address  # flwr's defaults are kept
    with pytest.raises(ValueError, match="exactly one"):
        write_connection(tmp_path, "neither", "127.0.0.1:8000")


# ---------------------------------------------------------------------- real processes


@pytest.fixture()
def federation(tmp_path):
    fed = LoopbackFederation(tmp_path, ROOT)
    yield fed
    fed.stop_all()


def wait_for_line(fed: LoopbackFederation, name: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in fed.log(name):
        if time.monotonic() > deadline or fed.procs["submit"].poll() is not None:
            pytest.fail(f"'{text}' never appeared in {name}'s log\n{fed.logs()}")
        time.sleep(0.5)


@pytest.mark.slow
def test_two_supernodes_fine_tune_over_tls_with_node_auth(tiny_model_dir, tmp_path, federation):
    federation.start_superlink()
    federation.start_supernodes(2)

    run_dir = tmp_path / "run"
    overrides = f"model.path={tiny_model_dir} {TINY_RUN} num_rounds=2 train.local_steps=4"
    federation.submit(overrides, run_dir)

    assert federation.wait("submit", timeout=240) == 0, federation.logs()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["accepted"] == 2
        assert {c["status"] for c in row["clients"].values()} == {"ok"}
        assert sorted(row["clients"]) == ["partition-0", "partition-1"]
    assert rows[-1]["eval-loss"] < rows[0]["eval-loss"]
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert "finished:completed" in federation.log("submit")


@pytest.mark.slow
def test_a_supernode_killed_mid_round_leaves_the_round_to_the_others(
        tiny_model_dir, tmp_path, federation):
    federation.start_superlink()
    federation.start_supernodes(3)

    run_dir = tmp_path / "run"
    # One round: a later round would wait for scenario.num_clients=3 live nodes again.
    # round_timeout leaves the survivors time on a loaded 2-core machine. The SuperLink gives
    # up on a dead node 60 s after its last heartbeat (sent every 17-23 s): 37-60 s after it.
    overrides = (f"model.path={tiny_model_dir} {TINY_RUN} num_rounds=1 train.local_steps=8 "
                 "scenario.num_clients=3 scenario.min_train_nodes=2 round_timeout=90")
    federation.submit(overrides, run_dir)
    # The victim's ClientApp logs this line just before its local training starts.
    wait_for_line(federation, "supernode-2", "Client 2: ", timeout=240)
    federation.kill("supernode-2")

    assert federation.wait("submit", timeout=240) == 0, federation.logs()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    clients = rows[1]["clients"]
    assert rows[1]["accepted"] == 2
    assert sorted(clients) == ["partition-0", "partition-1", "partition-2"]
    assert clients["partition-0"]["status"] == clients["partition-1"]["status"] == "ok"
    # Either the SuperLink's error reply for a node without heartbeats (mapped back to the
    # node it stands for), or nothing before round_timeout.
    victim = clients["partition-2"]["status"]
    assert victim == "no reply" or "Node Unavailable" in victim, victim
    assert (run_dir / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_a_restarted_superlink_takes_its_supernodes_back_and_the_run_resumes(
        tiny_model_dir, tmp_path, federation):
    """The SuperLink (and the ServerApp it runs) dies after round 1; started again on the
    same port and state, the SuperNodes reconnect by themselves and `resume=` finishes the
    run with every round and both clients (scripts/bench_faults.py compares the adapter)."""
    import torch

    from fedapp.server.checkpoint import CHECKPOINT

    federation.start_superlink()
    federation.start_supernodes(2)
    run_dir = tmp_path / "run"
    federation.submit(f"model.path={tiny_model_dir} {TINY_RUN} num_rounds=3 "
                      "train.local_steps=4", run_dir)
    deadline = time.monotonic() + 240
    while not (run_dir / CHECKPOINT).exists():
        if time.monotonic() > deadline or federation.procs["submit"].poll() is not None:
            pytest.fail(f"no checkpoint after round 1\n{federation.logs()}")
        time.sleep(0.2)
    port = int(federation.address.rsplit(":", 1)[1])
    federation.kill("superlink")
    federation.kill("submit")  # the operator's CLI: it would keep asking a dead SuperLink
    done = torch.load(run_dir / CHECKPOINT, weights_only=False)["server_round"]
    assert done < 3, "the run finished before the SuperLink was killed"

    federation.start_superlink(port)
    federation.wait_online(2, timeout=180)
    federation.submit(f"resume={run_dir}", run_dir, name="resubmit")

    assert federation.wait("resubmit", timeout=300) == 0, federation.logs()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["accepted"] == 2 and r["attempts"] == 1 for r in rows[1:])
    assert (run_dir / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_supernodes_load_their_stored_pruned_base_in_later_rounds(tiny_model_dir, tmp_path,
                                                                   federation):
    """A SuperNode starts a ClientApp process per message: from round 2 on, each FedSpine
    device loads the pruned base it stored after round 1 instead of the unpruned one."""
    cache = tmp_path / "cache"
    federation.extra_env = {"FEDAPP_PRUNED_STORE": "8", "FEDAPP_CACHE": str(cache)}
    federation.start_superlink()
    federation.start_supernodes(2)

    run_dir = tmp_path / "run"
    federation.submit(
        f"model.path={tiny_model_dir} scenario=two_clients train.max_length=64 "
        "eval.max_examples=16 partitioner=iid strategy=fedspine num_rounds=2 "
        "train.local_steps=2 strategy.bandit.prune_ratios=[0.5] strategy.bandit.ranks=[4] "
        "strategy.prune.tune_steps=1 +scenario.devices={dev:{sparsity:0.5}} "
        "+scenario.device_of_client=[dev]", run_dir)

    assert federation.wait("submit", timeout=300) == 0, federation.logs()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(c["status"] == "ok" for r in rows[1:] for c in r["clients"].values())
    assert all(c["sparsity"] == pytest.approx(0.5, abs=0.1) for c in rows[2]["clients"].values())
    assert [[c["pruned-stored"] for c in r["clients"].values()] for r in rows[1:]] == [
        [0.0, 0.0], [1.0, 1.0]]
    loaded = [federation.log(f"supernode-{i}").count("Loaded the pruned base from")
              for i in range(2)]
    assert loaded == [1, 1]  # round 2 only: round 1 pruned the unpruned base
    assert 1 <= len(list((cache / "pruned").iterdir())) <= 2
