"""MailEngine: a high-volume Mail Transfer Agent (a re-creation of Lyris MailEngine 2.0)."""
__version__ = "0.1.0"
NAME = "MailEngine"
