"""tailpy: a mesh VPN in the manner of Tailscale."""
