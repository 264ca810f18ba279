//! HAProxy's runtime API: one command per connection to its admin socket, and the reader of
//! `show stat`'s CSV.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a command may take.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Sends `command` and returns HAProxy's answer.
pub fn command(socket: &Path, command: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(command.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Sends a command that answers nothing when it works (`set server ...`); HAProxy's words
/// when it does not.
pub fn change(socket: &Path, line: &str) -> Result<(), String> {
    let answer = command(socket, line).map_err(|e| format!("HAProxy's runtime API: {e}"))?;
    let answer = answer.trim();
    if answer.is_empty() {
        Ok(())
    } else {
        Err(format!("HAProxy refused {line:?}: {answer}"))
    }
}

/// One line of `show stat`: a frontend, a backend, or a server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stat {
    /// The proxy (frontend or backend) name.
    pub proxy: String,
    /// `FRONTEND`, `BACKEND`, or the server's name.
    pub name: String,
    /// `UP`, `DOWN`, `MAINT`, `DRAIN`, `no check`, `OPEN`...
    pub status: String,
    /// Sessions open now.
    pub current_sessions: u64,
    /// Sessions since start.
    pub total_sessions: u64,
    /// Bytes from the clients.
    pub bytes_in: u64,
    /// Bytes to the clients.
    pub bytes_out: u64,
    /// The last check's result (`L4OK`, `L7STS`, `L4CON`...).
    pub check_status: String,
    /// The last check's detail.
    pub check_desc: String,
}

/// Reads `show stat`'s CSV (its first line names the columns, after `# `).
pub fn parse_stat(csv: &str) -> Vec<Stat> {
    let mut lines = csv.lines();
    let Some(header) = lines.next().and_then(|line| line.strip_prefix("# ")) else {
        return Vec::new();
    };
    let columns: Vec<&str> = header.split(',').collect();
    let at = |name: &str| columns.iter().position(|c| *c == name);
    let (proxy, name, status) = (at("pxname"), at("svname"), at("status"));
    let (scur, stot, bin, bout) = (at("scur"), at("stot"), at("bin"), at("bout"));
    let (check_status, check_desc) = (at("check_status"), at("check_desc"));
    lines
        .filter(|line| !line.is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let text = |i: Option<usize>| i.and_then(|i| fields.get(i)).unwrap_or(&"").to_string();
            let number = |i: Option<usize>| text(i).parse().unwrap_or(0);
            Stat {
                proxy: text(proxy),
                name: text(name),
                status: text(status),
                current_sessions: number(scur),
                total_sessions: number(stot),
                bytes_in: number(bin),
                bytes_out: number(bout),
                check_status: text(check_status),
                check_desc: text(check_desc),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `show stat` from HAProxy 2.6 (columns cut after check_desc's neighbours).
    const SHOW_STAT: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,\n\
s0-Wowza_GUI,FRONTEND,,,2,5,262114,40,5120,9000,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,0,0,3,,,,0,40,0,0,0,0,,0,3,40,,,0,0,0,0,,,,,,,,,,,,\n\
s0-Wowza_GUI,r0-Wowza_Srv_1,0,0,2,3,500,22,2816,4950,,0,,0,0,0,0,UP,100,1,0,0,0,120,0,,1,3,1,,22,,2,0,,2,L7OK,200,1,0,22,0,0,0,0,,,,22,0,0,,,,,0,OK,,0,0,1,2,,,,Layer7 check passed,\n\
s0-Wowza_GUI,r1-Wowza_Srv_2,0,0,0,1,,18,2304,4050,,0,,0,0,0,0,DOWN,100,1,0,2,1,3,3,,1,3,2,,18,,2,0,,1,L4CON,,0,0,18,0,0,0,0,,,,18,0,0,,,,,5,Connection refused,,0,0,1,1,,,,Connection refused,\n";

    #[test]
    fn show_stat_is_read_by_its_column_names() {
        let stats = parse_stat(SHOW_STAT);
        assert_eq!(stats.len(), 3);
        let up = &stats[1];
        assert_eq!(
            (up.proxy.as_str(), up.name.as_str(), up.status.as_str()),
            ("s0-Wowza_GUI", "r0-Wowza_Srv_1", "UP")
        );
        assert_eq!(
            (
                up.current_sessions,
                up.total_sessions,
                up.bytes_in,
                up.bytes_out
            ),
            (2, 22, 2816, 4950)
        );
        assert_eq!(up.check_status, "L7OK");
        let down = &stats[2];
        assert_eq!(
            (
                down.status.as_str(),
                down.check_status.as_str(),
                down.check_desc.as_str()
            ),
            ("DOWN", "L4CON", "Connection refused")
        );
        assert_eq!(stats[0].name, "FRONTEND");
    }

    #[test]
    fn anything_else_reads_as_nothing() {
        assert!(parse_stat("").is_empty());
        assert!(parse_stat("Unknown command.\n").is_empty());
        let short = parse_stat("# pxname,svname,status\nbe,srv\n");
        assert_eq!(short[0].status, "");
    }
}
