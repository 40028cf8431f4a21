"""The host side of the in-guest agent: its wire protocols and one session per instance."""
