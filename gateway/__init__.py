"""REST gateway: google.api.http transcoding to the shakenfist.v1 gRPC services.

app (aiohttp server, start_gateway), http_server (client limits and JSON
errors below the app), routes (path templates), codec (the Shaken Fist JSON
wire), schema (descriptors), openapi (/openapi.json, /docs), envoy (an Envoy
transcoder config), main (the sf-gateway command).
"""
