"""An OpenAPI 3.0 document and a plain HTML page, from the same descriptors.

Schemas describe the Shaken Fist wire, as gateway.codec writes it: wire_name
keys, enums as their wire_value strings (null for the unset value), 64-bit
integers as JSON numbers, wire_list messages as bare lists, unset message and
optional fields as null. Descriptions are the proto leading comments.
The schema's limits ((shakenfist.v1.limits), (shakenfist.v1.max_bytes)) are
JSON Schema keywords where there is one (maxLength, maxItems, maxProperties,
minimum, maximum) and x-max-bytes / x-max-key-length where there is none.
"""

import html as _html
import math
import re

from google.api import field_behavior_pb2
from google.protobuf import descriptor

from gateway import routes, schema
from shakenfist.v1 import wire_pb2

FD = descriptor.FieldDescriptor
_INTEGER = {FD.TYPE_INT32: 'int32', FD.TYPE_SINT32: 'int32', FD.TYPE_SFIXED32: 'int32',
            FD.TYPE_UINT32: 'int64', FD.TYPE_FIXED32: 'int64', FD.TYPE_INT64: 'int64',
            FD.TYPE_SINT64: 'int64', FD.TYPE_SFIXED64: 'int64', FD.TYPE_UINT64: 'int64',
            FD.TYPE_FIXED64: 'int64'}
_BINARY = {'type': 'string', 'format': 'binary'}
_NULL = {'description': 'Always null.', 'nullable': True, 'enum': [None]}
_VARIABLE = re.compile(r'\{([^}=]+)(=[^}]*)?\}')


def _name(desc):
    """Component name: short for our package, full otherwise."""
    prefix = schema.PACKAGE + '.'
    return desc.full_name[len(prefix):] if desc.full_name.startswith(prefix) else desc.full_name


def _ref(desc):
    return {'$ref': f'#/components/schemas/{_name(desc)}'}


def _wire_key(field):
    return field.GetOptions().Extensions[wire_pb2.wire_name] or field.name


def _is_map(field):
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _limits(field):
    options = field.GetOptions()
    return options.Extensions[wire_pb2.limits] if options.HasExtension(wire_pb2.limits) else None


def _value_limits(field, lim, target):
    """Keywords for one value of field (the field itself, an item, a map value)."""
    if field.type == FD.TYPE_STRING and lim.max_length:
        target['maxLength'] = lim.max_length
    elif field.type == FD.TYPE_BYTES and lim.max_length:
        target['maxLength'] = 4 * math.ceil(lim.max_length / 3)  # base64 on the wire
    if lim.HasField('minimum'):
        target['minimum'] = lim.minimum
    if lim.HasField('maximum'):
        target['maximum'] = lim.maximum
    if lim.max_bytes:
        target['x-max-bytes'] = lim.max_bytes  # protobuf encoding, as stored
    if field.type == FD.TYPE_MESSAGE and field.message_type.full_name == 'google.protobuf.Struct':
        if lim.max_items:
            target['maxProperties'] = lim.max_items
        if lim.max_key_length:
            target['x-max-key-length'] = lim.max_key_length


def _apply_limits(field, out):
    """Put field's limits on its schema out, at the level each applies to."""
    lim = _limits(field)
    if lim is None:
        return
    if _is_map(field):
        if lim.max_items:
            out['maxProperties'] = lim.max_items
        if lim.max_key_length:
            out['x-max-key-length'] = lim.max_key_length
        value_field, values = field.message_type.fields[1], out['additionalProperties']
        if '$ref' not in values:  # OpenAPI 3.0 ignores siblings of $ref
            _value_limits(value_field, lim, values)
    elif field.is_repeated:
        if lim.max_items:
            out['maxItems'] = lim.max_items
        if '$ref' not in out['items']:
            _value_limits(field, lim, out['items'])
    else:
        _value_limits(field, lim, out)


class _Builder:
    def __init__(self):
        self.comments = schema.comments()
        self.components = {}

    def describe(self, full_name, target):
        text = self.comments.get(full_name)
        if text:
            target['description'] = text
        return target

    # ------------------------------------------------------------- schemas

    def value(self, field):
        """Schema of one value of a field (an item, for repeated fields)."""
        if field.type == FD.TYPE_MESSAGE:
            name = field.message_type.full_name
            if name == 'google.protobuf.Struct':
                return {'type': 'object', 'additionalProperties': True}
            if name == 'google.protobuf.ListValue':
                return {'type': 'array', 'items': {}}
            if name == 'google.protobuf.Value':
                return {'nullable': True}
            if name == schema.HTTP_BODY:
                return dict(_BINARY)
            self.message(field.message_type)
            return _ref(field.message_type)
        if field.type == FD.TYPE_ENUM:
            self.enum(field.enum_type)
            return _ref(field.enum_type)
        if field.type in _INTEGER:
            return {'type': 'integer', 'format': _INTEGER[field.type]}
        if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return {'type': 'number', 'format': 'double' if field.type == FD.TYPE_DOUBLE else 'float'}
        if field.type == FD.TYPE_BOOL:
            return {'type': 'boolean'}
        if field.type == FD.TYPE_BYTES:
            return {'type': 'string', 'format': 'byte'}
        return {'type': 'string'}

    def field(self, field):
        if _is_map(field):
            out = {'type': 'object', 'additionalProperties': self.value(field.message_type.fields[1])}
        elif field.is_repeated:
            out = {'type': 'array', 'items': self.value(field)}
        else:
            out = self.value(field)
            if '$ref' in out:  # OpenAPI 3.0 ignores siblings of $ref
                out = {'allOf': [out]}
            if field.has_presence and field.type != FD.TYPE_ENUM:
                out['nullable'] = True  # unset is null on the wire
        _apply_limits(field, out)
        behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        if field_behavior_pb2.OUTPUT_ONLY in behaviors:
            out['readOnly'] = True
        return self.describe(field.full_name, out)

    def message(self, desc):
        name = _name(desc)
        if name in self.components:
            return
        self.components[name] = out = {}  # placed first: messages may recurse
        if desc.GetOptions().Extensions[wire_pb2.wire_list]:
            out.update(type='array', items=self.value(desc.fields[0]), nullable=True)
            _apply_limits(desc.fields[0], out)
        else:
            out.update(type='object', properties={_wire_key(f): self.field(f) for f in desc.fields})
            required = [_wire_key(f) for f in desc.fields if field_behavior_pb2.REQUIRED
                        in f.GetOptions().Extensions[field_behavior_pb2.field_behavior]]
            if required:
                out['required'] = required
        if max_bytes := desc.GetOptions().Extensions[wire_pb2.max_bytes]:
            out['x-max-bytes'] = max_bytes
        self.describe(desc.full_name, out)

    def enum(self, desc):
        name = _name(desc)
        if name not in self.components:
            wire = [v.GetOptions().Extensions[wire_pb2.wire_value] for v in desc.values]
            self.components[name] = self.describe(desc.full_name, {
                'type': 'string', 'nullable': True, 'enum': [w for w in wire if w] + [None]})

    # ---------------------------------------------------------- operations

    def operation(self, b: schema.Binding):
        path_names = ['.'.join(p) for p in routes.variables(b.template)]
        top_path_keys = {n.split('.')[0] for n in path_names}
        comment = self.comments.get(f'{b.service}.{b.method}', '')
        op = {'operationId': b.operation_id, 'tags': [b.service.rsplit('.', 1)[1]],
              'summary': comment.split('\n\n')[0].replace('\n', ' '), 'description': comment}
        if b.public:
            op['security'] = []

        params = [self.parameter(b.input, name, 'path') for name in path_names]
        websocket = b.client_streaming and b.server_streaming
        if b.body != '*' and not websocket:
            params += [self.parameter(b.input, f.name, 'query') for f in b.input.fields
                       if f.name not in top_path_keys and f.name != b.body and _query_field(f)]
            if b.body == '' and len(params) > len(path_names):
                op['description'] += '\n\nParameters may also be sent as a JSON object body.'
        if params:
            op['parameters'] = params

        if b.body == '*':
            self.message(b.input)
            component = self.components[_name(b.input)]
            body = {'type': 'object', 'properties': {
                k: v for k, v in component['properties'].items() if k not in top_path_keys}}
            required = [k for k in component.get('required', ()) if k not in top_path_keys]
            if required:
                body['required'] = required
            if 'x-max-bytes' in component:
                body['x-max-bytes'] = component['x-max-bytes']
            op['requestBody'] = {'required': False, 'content': {'application/json': {'schema': body}}}
        elif b.body:
            field = b.input.fields_by_name[b.body]
            if field.message_type is not None and field.message_type.full_name == schema.HTTP_BODY:
                content = {'application/octet-stream': {'schema': dict(_BINARY)}}
            else:
                content = {'application/json': {'schema': self.field(field)}}
            op['requestBody'] = {'required': True, 'content': content}

        op['responses'] = {'101' if websocket else '200': self.response(b),
                           'default': {'$ref': '#/components/responses/Error'}}
        return op

    def parameter(self, message, dotted, where):
        desc, field = message, None
        for name in dotted.split('.'):
            field = desc.fields_by_name[name]
            desc = field.message_type
        out = {'name': dotted if where == 'path' else _wire_key(field), 'in': where,
               'required': where == 'path', 'schema': self.field(field)}
        if 'description' in out['schema']:
            out['description'] = out['schema'].pop('description')
        return out

    def response(self, b: schema.Binding):
        headers = {'X-Request-ID': {'description': 'The request ID, also passed to the '
                                   'controller.', 'schema': {'type': 'string'}}}
        out_desc = b.output
        selected = out_desc.fields_by_name.get(b.response_body) if b.response_body else None
        if selected is not None and selected.message_type is not None \
                and selected.message_type.full_name == schema.HTTP_BODY:
            content = {'application/octet-stream': {'schema': dict(_BINARY)}}
        else:
            if selected is not None:
                body = self.field(selected)
                if 'next_page_token' in out_desc.fields_by_name:
                    headers['X-Next-Page-Token'] = self.describe(
                        f'{out_desc.full_name}.next_page_token',
                        {'schema': {'type': 'string'}})
            elif out_desc.fields:
                self.message(out_desc)
                body = _ref(out_desc)
            else:
                body = dict(_NULL)
            media = 'application/x-ndjson' if b.server_streaming else 'application/json'
            content = {media: {'schema': body}}
        description = self.comments.get(out_desc.full_name, 'Success.')
        if b.client_streaming and b.server_streaming:
            # A WebSocket (gateway.app): binary frames carry the messages' bytes.
            return {'description': f'{description} Switching to a WebSocket.', 'headers': headers,
                    'content': {'application/octet-stream': {'schema': dict(_BINARY)}}}
        if b.server_streaming:
            description += ' (streamed)'
        return {'description': description, 'headers': headers, 'content': content}


def _query_field(f):
    """Fields a query parameter can carry: scalars, enums, and lists of them."""
    return f.type != FD.TYPE_MESSAGE and not _is_map(f)


def openapi_path(template):
    return _VARIABLE.sub(r'{\1}', template)


def document() -> dict:
    builder = _Builder()
    paths = {}
    for b in schema.bindings():
        item = paths.setdefault(openapi_path(b.template), {})
        item[b.http_method.lower()] = builder.operation(b)
    builder.components['Error'] = {
        'type': 'object', 'required': ['error', 'status'],
        'description': 'Every error: a message for users and the HTTP status again.',
        'properties': {'error': {'type': 'string'}, 'status': {'type': 'integer'}}}
    tags = [builder.describe(name, {'name': name.rsplit('.', 1)[1]})
            for name in schema.service_names()]
    return {
        'openapi': '3.0.3',
        'info': {'title': 'Shaken Fist REST API', 'version': schema.PACKAGE.rsplit('.', 1)[1],
                 'description': 'The Shaken Fist REST API, transcoded to the shakenfist.v1 '
                                'gRPC services. Generated from the protobuf descriptors.'},
        'tags': tags,
        'paths': paths,
        'components': {
            'schemas': dict(sorted(builder.components.items())),
            'responses': {'Error': {'description': 'An error.', 'content': {
                'application/json': {'schema': {'$ref': '#/components/schemas/Error'}}}}},
            'securitySchemes': {'bearer': {'type': 'http', 'scheme': 'bearer',
                                           'description': 'The access_token from POST /auth.'}},
        },
        'security': [{'bearer': []}],
    }


# ------------------------------------------------------------------ HTML

_STYLE = ('body{font-family:sans-serif;max-width:60em;margin:auto;padding:1em}'
          'h3{font-family:monospace;background:#eee;padding:.3em}'
          'table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;'
          'vertical-align:top;text-align:left}p{white-space:pre-wrap}')


def _type(s, doc):
    if '$ref' in s:
        return s['$ref'].rsplit('/', 1)[1]
    if 'allOf' in s:
        return _type(s['allOf'][0], doc)
    if s.get('type') == 'array':
        return f'list of {_type(s.get("items", {}), doc)}'
    return s.get('format') if s.get('format') == 'binary' else s.get('type', 'any')


def html(doc) -> str:
    """A browsable page listing every operation; no scripts, no CDN."""
    e = _html.escape
    out = [f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{e(doc["info"]["title"])}'
           f'</title><style>{_STYLE}</style></head><body><h1>{e(doc["info"]["title"])}</h1>'
           f'<p>{e(doc["info"]["description"])}</p>'
           '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.0).</p>']
    by_tag = {}
    for path, item in doc['paths'].items():
        for verb, op in item.items():
            by_tag.setdefault(op['tags'][0], []).append((verb.upper(), path, op))
    for tag in doc['tags']:
        out.append(f'<h2 id="{e(tag["name"])}">{e(tag["name"])}</h2>'
                   f'<p>{e(tag.get("description", ""))}</p>')
        for verb, path, op in by_tag.get(tag['name'], []):
            out.append(f'<h3 id="{e(op["operationId"])}">{verb} {e(path)}</h3>'
                       f'<p>{e(op["description"])}</p>')
            rows = [(p['name'], p['in'], _type(p['schema'], doc), p.get('description', ''))
                    for p in op.get('parameters', [])]
            body = op.get('requestBody', {}).get('content', {})
            for media, spec in body.items():
                props = spec['schema'].get('properties')
                if props is None:
                    rows.append(('(body)', media, _type(spec['schema'], doc), ''))
                for name, s in (props or {}).items():
                    rows.append((name, 'body', _type(s, doc), s.get('description', '')))
            if rows:
                out.append('<table><tr><th>name</th><th>in</th><th>type</th>'
                           '<th>description</th></tr>')
                out += [f'<tr><td>{e(a)}</td><td>{e(b)}</td><td>{e(c)}</td><td>{e(d)}</td></tr>'
                        for a, b, c, d in rows]
                out.append('</table>')
            code = '101' if '101' in op['responses'] else '200'
            for media, spec in op['responses'][code].get('content', {}).items():
                out.append(f'<p>{code} {e(media)}: {e(_type(spec["schema"], doc))}</p>')
    out.append('</body></html>')
    return ''.join(out)
