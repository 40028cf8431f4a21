{
    'size': 20,
    'base': 'debian:11',
    'bus': None,
    'type': None
}
