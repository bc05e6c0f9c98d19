"""The SDS settings, apart from the SDS code: the daemon builds them from the config without importing
Envoy's protobuf modules (wlidd.workload_api.sds_service imports those only when SDS is served)."""

from __future__ import annotations

from dataclasses import dataclass

from wlidd.config.listeners import SDS_MAX_NAME_LENGTH, SdsConfig
from wlidd.errors import InvalidValue

MAX_NAME_LENGTH = SDS_MAX_NAME_LENGTH  # a resource name may be a SPIFFE ID (at most 2048 bytes)


@dataclass(frozen=True)
class SdsSettings:
    """Envoy SDS on the Workload API socket, with the settings of the SPIRE agent's `sds` block and its
    defaults (spiffe/spire doc/spire_agent.md "SDS Configuration"; pkg/agent/endpoints/sdsv3/handler.go
    `Config`, lines 54-62 at ef8527e). `enabled` is the inverse of SPIRE's `disable_sds_api`.

    default_svid_name               the tls_certificate name of the caller's default X.509-SVID
    default_bundle_name             the validation_context name of its own trust domain's bundle
    default_all_bundles_name        the validation_context name of every bundle (federation)
    disable_spiffe_cert_validation  validation contexts as trusted_ca instead of the SPIFFE certificate
                                    validator (an Envoy node's metadata key of that name overrides it)

    InvalidValue (reason `sds_settings`) for an empty name or one longer than MAX_NAME_LENGTH."""

    enabled: bool = True
    default_svid_name: str = "default"
    default_bundle_name: str = "ROOTCA"
    default_all_bundles_name: str = "ALL"
    disable_spiffe_cert_validation: bool = False

    def __post_init__(self) -> None:
        for what in ("default_svid_name", "default_bundle_name", "default_all_bundles_name"):
            name = getattr(self, what)
            if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
                raise InvalidValue(
                    "sds_settings", f"sds {what} must be a non-empty name of at most {MAX_NAME_LENGTH} characters"
                )

    @classmethod
    def from_config(cls, config: SdsConfig) -> SdsSettings:
        """The settings of a `[listeners.workload_api.sds]` section (validated there already)."""
        return cls(**config.model_dump())
