"""
Helpers for testing code that uses infsmtp.
"""

from ._certificates import CertificateAuthority, IssuedCertificate

__all__ = ["CertificateAuthority", "IssuedCertificate"]
