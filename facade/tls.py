"""TLS for the facade's two ends: its channel to the router (`grpc.tls`), its HTTPS (`api.tls`)."""

from __future__ import annotations

import ssl

import grpc

from router.config import TlsFiles

__all__ = ["channel_credentials", "server_ssl_context"]


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """How the facade verifies the router, and proves itself when the router asks (mTLS).

    The router is verified with `ca_file`, else with its own `cert_file` (a self-signed
    certificate is its own CA); `client_cert_file`/`client_key_file` are presented when set.
    """
    trusted = (tls.ca_file or tls.cert_file).read_bytes()
    if tls.client_cert_file is None or tls.client_key_file is None:
        return grpc.ssl_channel_credentials(root_certificates=trusted)
    return grpc.ssl_channel_credentials(
        root_certificates=trusted,
        private_key=tls.client_key_file.read_bytes(),
        certificate_chain=tls.client_cert_file.read_bytes(),
    )


def server_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """HTTPS for the facade; with `client_ca_file`, clients must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
