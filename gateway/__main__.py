"""`python -m gateway [serve|envoy|openapi] ...`: see gateway.main."""

from gateway.main import main

main()
