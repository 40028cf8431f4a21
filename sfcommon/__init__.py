"""Runtime pieces shared by sfcontrol, sfnode and the gateway."""
