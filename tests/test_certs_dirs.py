"""TLS per registry (issue 12): a host's CAs and client certificate from its certs.d
directory, as docker and podman read /etc/containers/certs.d and /etc/docker/certs.d
(here a directory given by TOSI_CERTS_DIRS); --ca-file (-ca-file on tosi) still wins;
a directory another user could write is not trusted. And a plain-HTTP registry
reached over TLS says so."""

import io
import os
import shutil

import pytest
import requests

from tests.support.images import file_entry, make_layer
from tests.support.registry import Registry
from tests.support.tls import CertificateAuthority
from tosi_tools.keychain import certs_dir_tls
from tosi_tools.plan import PlanReader

NOBODY = 65534


def _push(pusher, repo):
    return pusher.push_image(repo, "v1", [make_layer([file_entry("f", b"certs.d\n")])])


def _env(*roots, **extra):
    # Nothing but the certs.d directories may make the registry trusted.
    return {"TOSI_CERTS_DIRS": ":".join(str(root) for root in roots), "REQUESTS_CA_BUNDLE": "",
            "CURL_CA_BUNDLE": "", **extra}


def _certs_dir(root, host, **files):
    """root/<host>/ with the given files (name -> source path to copy)."""
    directory = root / host
    directory.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, directory / name.replace("_", "."))
    return directory


def _image_record(proc):
    return PlanReader(io.StringIO(proc.stdout)).image


@pytest.fixture
def other_ca(tmp_path):
    path, _ = CertificateAuthority("some other CA").write(str(tmp_path / "other-ca"), "ca")
    return path


def test_a_ca_in_the_hosts_certs_d_directory_verifies_the_registry(tool, tls_registry, tls_pusher, repo_name,
                                                                   workdir, tmp_path):
    image = _push(tls_pusher, repo_name)
    _certs_dir(tmp_path / "certs.d", tls_registry.host, ca_crt=tls_registry.ca_file)
    env = _env(tmp_path / "certs.d")
    plan = tool("tosi-resolve", "-v", "--workdir", workdir, f"{tls_registry.host}/{repo_name}:v1", env=env,
                check=0)
    record = _image_record(plan)
    assert (record.digest, record.endpoint, record.ca_file) == (image.digest, tls_registry.url, None)
    assert f"TLS for {tls_registry.host} from {tmp_path / 'certs.d' / tls_registry.host}" in plan.stderr
    tool("tosi-fetch", "--workdir", workdir, input=plan.stdout, env=env, check=0)


def test_the_first_root_holding_a_directory_for_the_host_is_used(tool, tls_registry, tls_pusher, repo_name,
                                                                 workdir, tmp_path, other_ca):
    _push(tls_pusher, repo_name)
    _certs_dir(tmp_path / "first", "elsewhere.example.com", ca_crt=other_ca)
    _certs_dir(tmp_path / "second", tls_registry.host, registry_crt=tls_registry.ca_file)
    _certs_dir(tmp_path / "third", tls_registry.host, ca_crt=other_ca)
    tool("tosi-resolve", "--workdir", workdir, f"{tls_registry.host}/{repo_name}:v1", check=0,
         env=_env(tmp_path / "first", tmp_path / "second", tmp_path / "third"))


def test_without_a_directory_for_the_host_the_registry_is_not_trusted(tool, tls_registry, tls_pusher,
                                                                      repo_name, workdir, tmp_path):
    _push(tls_pusher, repo_name)
    _certs_dir(tmp_path / "certs.d", "127.0.0.1", ca_crt=tls_registry.ca_file)  # no port: another host
    proc = tool("tosi-resolve", "--workdir", workdir, f"{tls_registry.host}/{repo_name}:v1", check=1,
                env=_env(tmp_path / "certs.d"))
    assert "CERTIFICATE_VERIFY_FAILED" in proc.stderr


def test_ca_file_wins_over_the_certs_d_directory(tool, tls_registry, tls_pusher, repo_name, workdir, tmp_path,
                                                 other_ca):
    _push(tls_pusher, repo_name)
    _certs_dir(tmp_path / "certs.d", tls_registry.host, ca_crt=tls_registry.ca_file)
    proc = tool("tosi-resolve", "--workdir", workdir, "--ca-file", other_ca, f"{tls_registry.host}/{repo_name}:v1",
                env=_env(tmp_path / "certs.d"), check=1)
    assert "CERTIFICATE_VERIFY_FAILED" in proc.stderr


@pytest.mark.parametrize("unsafe", ["owner", "mode"])
def test_a_certs_d_directory_another_user_could_write_is_not_used(tool, tls_registry, tls_pusher, repo_name,
                                                                  workdir, tmp_path, unsafe):
    _push(tls_pusher, repo_name)
    directory = _certs_dir(tmp_path / "certs.d", tls_registry.host, ca_crt=tls_registry.ca_file)
    if unsafe == "owner":
        os.chown(directory, NOBODY, NOBODY)
    else:
        directory.chmod(0o777)
    proc = tool("tosi-resolve", "--workdir", workdir, f"{tls_registry.host}/{repo_name}:v1", check=1,
                env=_env(tmp_path / "certs.d"))
    warning, error = proc.stderr.splitlines()
    assert f"certificates for {tls_registry.host} in {directory} not used" in warning
    assert ("owned by uid 65534, not by root" if unsafe == "owner" else "writable by others") in warning
    assert "CERTIFICATE_VERIFY_FAILED" in error


def test_a_ca_file_another_user_owns_is_not_used(tool, tls_registry, tls_pusher, repo_name, workdir, tmp_path):
    _push(tls_pusher, repo_name)
    directory = _certs_dir(tmp_path / "certs.d", tls_registry.host, ca_crt=tls_registry.ca_file)
    os.chown(directory / "ca.crt", NOBODY, NOBODY)
    proc = tool("tosi-resolve", "--workdir", workdir, f"{tls_registry.host}/{repo_name}:v1", check=1,
                env=_env(tmp_path / "certs.d"))
    assert f"certificate file not used: {directory / 'ca.crt'} is owned by uid 65534" in proc.stderr


def test_a_client_certificate_without_its_key_is_not_used_and_said_so(tmp_path):
    directory = _certs_dir(tmp_path, "r.example.com")
    (directory / "client.cert").write_text("x")
    (directory / "ca.crt").write_text("x")
    used, ca_files, client, warnings = certs_dir_tls("r.example.com", [str(tmp_path)])
    assert (used, ca_files, client) == (str(directory), (str(directory / "ca.crt"),), None)
    [warning] = warnings
    assert "client.cert has no client.key beside it" in warning


# ---------------------------------------------------------------- client certificates

@pytest.fixture(scope="module")
def client_cert_registry(tmp_path_factory):
    """An https registry on 127.0.0.1 that accepts only clients with a certificate from
    its client CA (distribution's http.tls.clientcas); `.client_files` for a certs.d dir."""
    directory = tmp_path_factory.mktemp("client-cert-registry")
    server_ca, client_ca = CertificateAuthority("server CA"), CertificateAuthority("client CA")
    ca_file, _ = server_ca.write(str(directory), "ca")
    client_ca_file, _ = client_ca.write(str(directory), "client-ca")
    cert, key = server_ca.issue("127.0.0.1", ips=["127.0.0.1"]).write(str(directory), "server")
    client_cert, client_key = client_ca.issue("tosi test client", server=False).write(
        str(directory / "client"), "client")
    reg = Registry(str(directory), scheme="https", ca_file=ca_file, client_cert=(client_cert, client_key),
                   extra_config={"http": {"tls": {"certificate": cert, "key": key,
                                                  "clientcas": [client_ca_file]}}}).start()
    reg.client_files = {"ca_crt": ca_file, "client_cert": client_cert, "client_key": client_key}
    yield reg
    reg.stop()


@pytest.fixture
def client_cert_image(client_cert_registry, repo_name):
    from tests.support.images import Pusher

    session = requests.Session()
    session.trust_env = False
    session.cert = client_cert_registry.client_cert
    return _push(Pusher(client_cert_registry.url, session=session, verify=client_cert_registry.ca_file),
                 repo_name)


def test_a_client_certificate_in_the_certs_d_directory_is_presented(tool, client_cert_registry,
                                                                    client_cert_image, workdir, tmp_path):
    _certs_dir(tmp_path / "certs.d", client_cert_registry.host, **client_cert_registry.client_files)
    env = _env(tmp_path / "certs.d")
    reference = f"{client_cert_registry.host}/{client_cert_image.repo}:v1"
    tool("tosi", "-workdir", workdir, "-image", reference, "-extractto", tmp_path / "root", env=env, check=0)
    assert (tmp_path / "root" / "f").read_bytes() == b"certs.d\n"


def test_without_the_client_certificate_the_registry_refuses_the_handshake(tool, client_cert_registry,
                                                                           client_cert_image, workdir,
                                                                           tmp_path):
    files = dict(client_cert_registry.client_files)
    del files["client_key"]
    _certs_dir(tmp_path / "certs.d", client_cert_registry.host, **files)
    reference = f"{client_cert_registry.host}/{client_cert_image.repo}:v1"
    proc = tool("tosi-resolve", "--workdir", workdir, reference, env=_env(tmp_path / "certs.d"), check=1)
    assert "TLS failure" in proc.stderr.splitlines()[-1]


# ---------------------------------------------------------------- tosi -ca-file

def test_tosi_verifies_the_registry_with_ca_file(tool, tls_registry, tls_pusher, repo_name, workdir, tmp_path):
    _push(tls_pusher, repo_name)
    tool("tosi", "-workdir", workdir, "-ca-file", tls_registry.ca_file, "-image",
         f"{tls_registry.host}/{repo_name}:v1", "-extractto", tmp_path / "root", env=_env(), check=0)
    assert (tmp_path / "root" / "f").read_bytes() == b"certs.d\n"


def test_tosi_without_ca_file_does_not_trust_the_registry(tool, tls_registry, tls_pusher, repo_name, workdir,
                                                          tmp_path):
    _push(tls_pusher, repo_name)
    proc = tool("tosi", "-workdir", workdir, "-image", f"{tls_registry.host}/{repo_name}:v1", "-extractto",
                tmp_path / "root", env=_env(), check=1)
    assert "CERTIFICATE_VERIFY_FAILED" in proc.stderr


def test_tosi_ca_file_that_names_no_file_is_a_usage_error(tool, tmp_path):
    proc = tool("tosi", "-ca-file", tmp_path / "missing.pem", "-image", "alpine", check=2)
    assert proc.stderr == f"tosi: error: -ca-file '{tmp_path / 'missing.pem'}': no such file\n"


# ---------------------------------------------------------------- plain HTTP answered over TLS

def _off_loopback_spelling(registry):
    # 127.1 is 127.0.0.1 to the resolver, but not a name tosi takes for loopback: it
    # speaks https to it, as to any remote registry.
    return registry.host.replace("127.0.0.1", "127.1")


def test_a_plain_http_registry_reached_over_tls_says_so_and_names_insecure(tool, registry, pusher, repo_name,
                                                                           workdir):
    _push(pusher, repo_name)
    host = _off_loopback_spelling(registry)
    proc = tool("tosi-resolve", "--workdir", workdir, f"{host}/{repo_name}:v1", check=1)
    assert proc.stderr == f"tosi-resolve: error: {host} speaks plain HTTP; use --insecure\n"
    plan = tool("tosi-resolve", "--workdir", workdir, "--insecure", f"{host}/{repo_name}:v1", check=0)
    assert _image_record(plan).endpoint == f"http://{host}"


def test_tosi_names_its_own_insecure_flag_for_a_plain_http_registry(tool, registry, pusher, repo_name, workdir,
                                                                    tmp_path):
    _push(pusher, repo_name)
    host = _off_loopback_spelling(registry)
    proc = tool("tosi", "-workdir", workdir, "-image", f"{host}/{repo_name}:v1", "-extractto", tmp_path / "root",
                check=1)
    assert proc.stderr == f"tosi: error: {host} speaks plain HTTP; use -insecure\n"


def test_an_https_endpoint_of_a_plain_http_registry_asks_for_an_http_one(tool, registry, pusher, repo_name,
                                                                         workdir, tmp_path):
    _push(pusher, repo_name)
    proc = tool("tosi", "-workdir", workdir, "-insecure", "-url", f"https://{registry.host}", "-image",
                f"{repo_name}:v1", "-extractto", tmp_path / "root", check=1)
    assert proc.stderr == (f"tosi: error: {registry.host} speaks plain HTTP; reach it as "
                           f"http://{registry.host}\n")
