//! Schemas for the strings that carry meaning in a flow file. They exist only to describe
//! those strings in `schema/flow.schema.json`; `compile` does the real checking.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

macro_rules! string_schema {
    ($name:ident, $doc:literal, $schema:tt) => {
        #[doc = $doc]
        pub struct $name;
        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!($schema)
            }
        }
    };
}

string_schema!(Duration, "A duration: `90m`, `12h`, `3d`, `2w`, or a compound like `1d12h`.", {
    "type": "string",
    "description": "A duration: 90m, 12h, 3d, 2w, or a compound like 1d12h.",
    "pattern": "^([0-9]+[smhdw])+$"
});
string_schema!(Expression, "A CEL expression over customer, event, vars and now.", {
    "type": "string",
    "description": "A CEL expression over customer.*, event.*, vars.*, now, with duration literals (2d) and date helpers (days_since, at, birthday_this_year, start_of_month, end_of_month, start_of_next_month, month, weekday, ...)."
});
string_schema!(Cron, "A cron expression, 5 or 6 fields.", {
    "type": "string",
    "description": "Cron, 5 fields (minute hour day month weekday) or 6 (with seconds first), in the flow time zone."
});
string_schema!(StepId, "A kebab-case id.", {
    "type": "string",
    "pattern": "^[a-z][a-z0-9]*(-[a-z0-9]+)*$"
});
string_schema!(Identifier, "An event, outcome or variable name.", {
    "type": "string",
    "pattern": "^[A-Za-z_][A-Za-z0-9_.:-]*$"
});
string_schema!(TimeZone, "An IANA time zone.", {
    "type": "string",
    "description": "An IANA time zone such as Asia/Shanghai or Europe/Paris.",
    "examples": ["Asia/Shanghai", "UTC"]
});
string_schema!(Percent, "A share in percent.", {
    "oneOf": [
        { "type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?%$" },
        { "type": "number", "exclusiveMinimum": 0, "maximum": 100 }
    ]
});
string_schema!(TimeRange, "A local time range.", {
    "type": "string",
    "pattern": "^[0-2][0-9]:[0-5][0-9]-[0-2][0-9]:[0-5][0-9]$",
    "examples": ["10:00-20:00"]
});
