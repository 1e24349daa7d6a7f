"""TLS: --ssl-certfile/--ssl-keyfile put gRPC and HTTP behind TLS, with a self-signed certificate made here."""

import datetime
import ipaddress
import os
import subprocess

import grpc
import httpx
import pytest

from conftest import PYTHON, ROOT, free_port, serve_process

BODY = {"message": [{"role": "user", "content": "hi"}], "gen_conf": {"max_new_tokens": 4}}


def self_signed_certificate(folder):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(tiny_models, tmp_path_factory):
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    grpc_port, http_port, openai_port = free_port(), free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(tiny_models["chat"]), "--protocol", "grpc", "http",
            "--port", str(grpc_port), str(http_port), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
            "--openai-port", str(openai_port)]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        yield {"grpc": grpc_port, "http": http_port, "openai": openai_port, "cert": cert,
               "model": str(tiny_models["chat"])}


def test_https_answers_and_plain_http_does_not(tls_server):
    url = f"https://localhost:{tls_server['http']}/chat"
    answer = httpx.post(url, json={"data": [BODY]}, verify=str(tls_server["cert"]), timeout=60)
    assert answer.status_code == 200 and answer.json()["data"][0]["text"]
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"http://localhost:{tls_server['http']}/chat", json={"data": [BODY]}, timeout=10)


def test_grpc_needs_tls(tls_server):
    target = f"localhost:{tls_server['grpc']}"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(tls_server["cert"].read_bytes())) as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=3)


def test_jina_client_over_grpcs(tls_server):
    """In a process of its own: gRPC reads the trusted roots from the environment once per process."""
    script = ("import asyncio; from docarray import DocList; from jina import Client; from schemas import Generation, Prompt\n"
              f"host, prompt = 'grpcs://localhost:{tls_server['grpc']}', Prompt(**{BODY!r})\n"
              "async def stream():\n"
              "    client = Client(host=host, asyncio=True)\n"
              "    return [p async for p in client.stream_doc(on='/stream', inputs=prompt, return_type=Generation)]\n"
              "pieces = asyncio.run(stream())\n"
              "whole = Client(host=host).post('/chat', inputs=prompt, return_type=DocList[Generation])[0]\n"
              "assert whole.text and ''.join(p.text for p in pieces) == whole.text, (pieces, whole)\n"
              "print('answered over grpcs')\n")
    result = subprocess.run([PYTHON, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(tls_server["cert"])})
    assert "answered over grpcs" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("flags, message", [
    (["--ssl-certfile", "cert.pem"], "needs both --ssl-certfile and --ssl-keyfile"),
    (["--ssl-certfile", "/no/such.pem", "--ssl-keyfile", "/no/such.key"], "--ssl-certfile=/no/such.pem: no such"),
])
def test_tls_flags_are_checked_before_start(flags, message):
    result = subprocess.run([PYTHON, "jina_server.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_openai_api_over_https(tls_server):
    """The OpenAI port serves HTTPS too, and reaches the TLS gRPC port behind it."""
    import openai

    client = openai.OpenAI(base_url=f"https://localhost:{tls_server['openai']}/v1", api_key="none", max_retries=0,
                           http_client=httpx.Client(verify=str(tls_server["cert"])))
    answer = client.chat.completions.create(model=tls_server["model"], messages=BODY["message"], max_tokens=4,
                                            temperature=0)
    assert answer.choices[0].message.content and answer.usage.completion_tokens == 4
