"""Device trust: TPM 2.0 attestation, enrollment and signed updates.

Device side (``fedd agent``, ``scripts/enroll``):

- `fedd.trust.tpm`: opens the TPM through an explicit TCTI, creates or loads
  the persistent attestation key (AK), measures the agent into a PCR and
  quotes PCRs over the hub's nonce. Needs the optional ``tpm`` extra
  (tpm2-pytss); a device without a TPM gets a `NoTpm` that says why.
- `fedd.trust.measure`: the digest of the agent's code and model (pure).
- `fedd.trust.signing`: the Ed25519 device key that signs every update.

Hub side:

- `fedd.trust.enrollments`: one strict enrollment record per device.
- `fedd.trust.verify`: `verify_quote` with one stable reason per refusal.
- `fedd.trust.nonces`, `fedd.trust.policy`, `fedd.trust.state`: single-use
  nonces, allowed PCR values per device class, and the fleet's
  require/prefer/off decision for updates from each device.

Both: `fedd.trust.quote` (the attestation as it travels) and
`fedd.trust.reasons` (reason codes and verdicts). Nothing here imports MQTT,
the agent or the hub; only `tpm`, `attest`, `enrollments` and `verify`
import tpm2-pytss, and only `tpm` talks to a TPM.
"""
