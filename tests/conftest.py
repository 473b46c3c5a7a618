"""Servers the tests need, started on 127.0.0.1 by the tests themselves and stopped at the end."""

from __future__ import annotations

import os

import pytest

from bbformat.serve import start_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def served_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="session")
def http_url(served_dir):
    """Base URL of a Range-capable HTTP server over `served_dir`."""
    server, url = start_server(served_dir)
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def http_norange_url(served_dir):
    """Base URL of a server that ignores Range (like Python's http.server)."""
    server, url = start_server(served_dir, honour_range=False)
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """(bucket URL prefix, storage_options) of a moto S3 server on 127.0.0.1."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    region = "eu-west-1"  # moto refuses to create buckets without a LocationConstraint outside us-east-1
    boto3.client("s3", endpoint_url=endpoint, region_name=region).create_bucket(
        Bucket="bbf-test", CreateBucketConfiguration={"LocationConstraint": region})
    opts = {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": region}}
    yield "s3://bbf-test", opts
    server.stop()
