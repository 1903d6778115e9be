//! Protocol messages as Triton's HTTP endpoints write them: proto field
//! names, enums by name, 64-bit integers as JSON numbers, zero values present.
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use std::sync::LazyLock;

pub(crate) static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET).expect("descriptor set built by build.rs")
});

/// `message` (of the type named `full_name`, e.g. `inference.ModelConfig`) as JSON.
pub fn to_json<M: prost::Message>(message: &M, full_name: &str) -> serde_json::Value {
    let descriptor = POOL
        .get_message_by_name(full_name)
        .unwrap_or_else(|| panic!("{full_name} is in the protos"));
    let mut msg = DynamicMessage::new(descriptor);
    msg.transcode_from(message)
        .expect("a message matches its own descriptor");
    let options = SerializeOptions::new()
        .stringify_64_bit_integers(false)
        .skip_default_fields(false)
        .use_proto_field_name(true);
    msg.serialize_with_options(serde_json::value::Serializer, &options)
        .expect("a protocol message always serializes")
}
